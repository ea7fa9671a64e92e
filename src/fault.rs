//! Whose fault an error is — decided once, where the error is made, so that every loop
//! treats the same error the same way (`retry` acts on it). A leaf module.

use std::fmt::Display;

/// Whose fault an error is, which decides what the loop does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Connection, timeout, overload, deadlock: the same request may succeed later.
    Transient,
    /// The data was refused (a constraint, a value out of range): retrying cannot help; the
    /// record at fault is dead-lettered and the rest goes on.
    Input,
    /// A broken schema, bad credentials, a broken invariant: stop and say so.
    Bug,
}

/// An error that knows its [`Fault`].
pub trait Classify: Display {
    fn fault(&self) -> Fault;
}
