//! Escaping of strings that come from data (ids, accounts, models, rule ids...) before the
//! CLI prints them or a log line carries them: a terminal obeys control characters (ANSI escape sequences, carriage
//! returns that overwrite a line) and bidirectional overrides (which reverse what follows),
//! so a producer could otherwise rewrite what an operator reads. Pure; no IO.

use std::borrow::Cow;
use std::fmt::Write;

/// Would `c` change how a terminal shows the text around it? Control characters (C0, DEL,
/// C1) and the bidirectional marks, embeddings, overrides and isolates.
fn must_escape(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{61c}' | '\u{200e}' | '\u{200f}'
        | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` as it may be shown on a terminal: `\` becomes `\\`, `\n`, `\r` and `\t` keep their
/// usual escapes, and every other character that [`must_escape`] becomes `\u{XX}` (hex, as
/// Rust writes it). Text without such characters is returned as it is, unallocated. The
/// escape is unambiguous: a backslash in the output always starts an escape.
pub fn shown(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || must_escape(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if must_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `shown` for an optional string, with `none` in its place when absent.
pub fn shown_or<'a>(s: Option<&'a str>, none: &'a str) -> Cow<'a, str> {
    s.map_or(Cow::Borrowed(none), shown)
}

/// JSON text (as serde_json writes it) made safe for a terminal without changing what it
/// means: serde_json already escapes C0 controls, `"` and `\`, but writes DEL, C1 controls
/// and bidirectional characters raw. Outside strings JSON holds none of them, so each is
/// replaced by its `\uXXXX` escape, which a JSON reader decodes to the same string.
pub fn json(text: &str) -> Cow<'_, str> {
    // serde_json already escapes control characters inside strings; the layout's newlines,
    // tabs and carriage returns between tokens stay as they are (escaped they break the JSON).
    let must = |c: char| must_escape(c) && !matches!(c, '\n' | '\r' | '\t');
    if !text.chars().any(must) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if must(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_as_it_is() {
        for s in [
            "",
            "acct-0001",
            "g-top-up 2025/06",
            "modèle é 漢字 \u{1F600}",
            "a\"b'",
        ] {
            assert!(matches!(shown(s), Cow::Borrowed(b) if b == s), "{s:?}");
            assert!(matches!(json(s), Cow::Borrowed(b) if b == s), "{s:?}");
        }
    }

    #[test]
    fn control_and_bidirectional_characters_are_escaped() {
        let cases = [
            ("p\u{0}oison", r"p\u{0}oison"),
            ("red\u{1b}[31mtext", r"red\u{1b}[31mtext"),
            ("a\nb\rc\td", r"a\nb\rc\td"),
            ("del\u{7f}", r"del\u{7f}"),
            ("c1\u{85}\u{9b}", r"c1\u{85}\u{9b}"),
            ("g-\u{202e}gpj.exe", r"g-\u{202e}gpj.exe"),
            (
                "\u{202a}\u{202b}\u{202c}\u{202d}",
                r"\u{202a}\u{202b}\u{202c}\u{202d}",
            ),
            (
                "\u{2066}x\u{2067}y\u{2068}z\u{2069}",
                r"\u{2066}x\u{2067}y\u{2068}z\u{2069}",
            ),
            ("\u{200e}\u{200f}\u{61c}", r"\u{200e}\u{200f}\u{61c}"),
            // A backslash is doubled, so a printed escape cannot be forged.
            (r"fake\u{0}", r"fake\\u{0}"),
            ("\\", r"\\"),
        ];
        for (input, expected) in cases {
            assert_eq!(shown(input), expected, "{input:?}");
        }
        assert_eq!(shown_or(None, "-"), "-");
        assert_eq!(shown_or(Some("g\u{1b}"), "-"), r"g\u{1b}");
    }

    #[test]
    fn json_keeps_its_meaning() {
        let value = serde_json::json!({
            "grant_id": "g-\u{202e}1\u{7f}\u{85}\u{2066}",
            "nul": "p\u{0}oison",
            "plain": "x\\y",
        });
        let text = serde_json::to_string(&value).unwrap();
        let safe = json(&text);
        assert_eq!(
            safe,
            r#"{"grant_id":"g-\u202e1\u007f\u0085\u2066","nul":"p\u0000oison","plain":"x\\y"}"#
        );
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, value);
    }
}
