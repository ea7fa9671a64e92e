//! The books' [`Mark`]s between batches, in memory only: a replay starts at the newest mark
//! before the event out of order instead of at the checkpoint. Marks are kept for the book
//! [`version`](Book::version) they were taken at, by the store whose transaction committed
//! them; a book loaded at another version (another instance applied to it, the scheduler
//! moved its final point, a transaction failed after the marks were lent) gets none and
//! replays from the checkpoint, with the same result ([`Book::apply`]).

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use lru::LruCache;

use crate::ledger::book::{Book, Mark};

/// Accounts whose marks are kept (the least recently applied leave first): at most
/// [`crate::ledger::book::MARKS_KEPT`] account states each.
pub const MARKED_ACCOUNTS: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

pub struct MarkCache {
    cache: LruCache<String, (u64, Vec<Mark>)>,
}

impl Default for MarkCache {
    fn default() -> Self {
        MarkCache {
            cache: LruCache::new(MARKED_ACCOUNTS),
        }
    }
}

impl MarkCache {
    /// Moves the marks cached at each book's version into the book (they come back with
    /// [`MarkCache::keep`] once the transaction commits).
    pub fn lend(&mut self, books: &mut BTreeMap<String, Book>) {
        for (id, book) in books {
            if let Some((version, marks)) = self.cache.pop(id) {
                if version == book.version {
                    book.marks = marks;
                }
            }
        }
    }

    /// Keeps the marks of books whose transaction committed.
    pub fn keep(&mut self, books: &mut BTreeMap<String, Book>) {
        for (id, book) in books {
            if !book.marks.is_empty() {
                let marks = std::mem::take(&mut book.marks);
                self.cache.put(id.clone(), (book.version, marks));
            }
        }
    }
}
