//! `tally prices check` on any text: the checker never panics, and a table it accepts checks
//! the same way again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(source) = std::str::from_utf8(bytes) else {
        return;
    };
    match tally::rating::check(source) {
        Ok(table) => {
            let again = tally::rating::check(source).expect("accepted once, accepted again");
            assert_eq!(table.versions().len(), again.versions().len());
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "rejected without an error");
            for e in &errors {
                let _ = e.to_string();
            }
        }
    }
});
