//! Status codes, the binding's error type and the last-error message.
//!
//! With `std` the message is thread-local (each thread sees the message of its own last call);
//! without `std` it is one global buffer, so a firmware caller that calls from several contexts
//! must serialise the calls (the kernels themselves keep no state).

use core::fmt::{self, Write};
use sar_math::SarError;

/// What a call returned. `SAR_OK` (0) is success; every other value names a kind of error, and
/// [`sar_last_error_message`] says which tensor or parameter and why.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SarStatus {
    /// Success.
    SarOk = 0,
    /// A required pointer was null (a null pointer is allowed only for an empty array or an
    /// optional output).
    SarErrNullPointer = 1,
    /// An array has the wrong length for the dims given.
    SarErrLength = 2,
    /// The dims do not make a valid shape (zero classes, a rank that is not 2 or 4, …).
    SarErrShape = 3,
    /// The dims overflow `size_t`.
    SarErrOverflow = 4,
    /// A label is neither a class in `0..C` nor the ignore index.
    SarErrLabel = 5,
    /// A parameter is outside its domain (τ, δ, α, λ, an enum value).
    SarErrParam = 6,
    /// An input (or a result) is NaN or infinite.
    SarErrNonFinite = 7,
    /// A fixed capacity is too small.
    SarErrCapacity = 8,
    /// A Rust panic was caught at the boundary (a bug: please report it with the message).
    SarErrPanic = 9,
}

/// The binding's error: one of `sar-math`'s, or one found by the binding itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Error {
    /// An error of a `sar-math` kernel.
    Sar(SarError),
    /// A required pointer was null; names the argument.
    Null(&'static str),
    /// A check of the binding: the status and a message naming the tensor or parameter.
    Input(SarStatus, &'static str),
    /// A shape error with the offending tensor named and its expected form.
    BadShape {
        /// The tensor.
        tensor: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// A caught panic (with `std`).
    Panic,
}

impl From<SarError> for Error {
    fn from(e: SarError) -> Self {
        Error::Sar(e)
    }
}

impl Error {
    /// The status code of this error.
    pub fn status(&self) -> SarStatus {
        match self {
            Error::Sar(e) => match e {
                SarError::Length { .. } => SarStatus::SarErrLength,
                SarError::Shape { .. } => SarStatus::SarErrShape,
                SarError::Overflow { .. } => SarStatus::SarErrOverflow,
                SarError::Label { .. } => SarStatus::SarErrLabel,
                SarError::Param { .. } => SarStatus::SarErrParam,
                SarError::NonFinite { .. } => SarStatus::SarErrNonFinite,
                SarError::Capacity { .. } => SarStatus::SarErrCapacity,
            },
            Error::Null(_) => SarStatus::SarErrNullPointer,
            Error::Input(s, _) => *s,
            Error::BadShape { .. } => SarStatus::SarErrShape,
            Error::Panic => SarStatus::SarErrPanic,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Sar(e) => write!(f, "{e}"),
            Error::Null(name) => write!(f, "`{name}` is a null pointer"),
            Error::Input(_, msg) => f.write_str(msg),
            Error::BadShape { tensor, expected } => {
                write!(f, "tensor `{tensor}`: shape must be {expected}")
            }
            Error::Panic => f.write_str("panic inside sar-capi"),
        }
    }
}

/// The binding's result.
pub type Result<T> = core::result::Result<T, Error>;

/// Capacity of the last-error message, NUL included (longer messages are cut).
pub const SAR_MESSAGE_CAPACITY: usize = 512;

struct Message {
    buf: [u8; SAR_MESSAGE_CAPACITY],
    len: usize,
}

impl Message {
    const EMPTY: Message = Message {
        buf: [0; SAR_MESSAGE_CAPACITY],
        len: 0,
    };
    fn set(&mut self, args: fmt::Arguments<'_>) {
        self.len = 0;
        let _ = self.write_fmt(args); // a cut message is still a message
        self.buf[self.len] = 0;
    }
}

impl Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            let mut tmp = [0u8; 4];
            let bytes = ch.encode_utf8(&mut tmp).as_bytes();
            // Keep one byte for the NUL, and never cut a character in two.
            if self.len + bytes.len() >= SAR_MESSAGE_CAPACITY {
                return Err(fmt::Error);
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

#[cfg(feature = "std")]
mod store {
    use super::Message;
    use core::cell::RefCell;
    std::thread_local! {
        static LAST: RefCell<Message> = const { RefCell::new(Message::EMPTY) };
    }
    pub(super) fn with<R>(f: impl FnOnce(&mut Message) -> R) -> R {
        LAST.with(|m| f(&mut m.borrow_mut()))
    }
}

#[cfg(not(feature = "std"))]
mod store {
    use super::Message;
    use core::cell::UnsafeCell;
    struct Global(UnsafeCell<Message>);
    // SAFETY: documented contract: without std, calls into sar-capi are not concurrent.
    unsafe impl Sync for Global {}
    static LAST: Global = Global(UnsafeCell::new(Message::EMPTY));
    pub(super) fn with<R>(f: impl FnOnce(&mut Message) -> R) -> R {
        // SAFETY: no reference to the buffer outlives this call, and calls are not concurrent.
        f(unsafe { &mut *LAST.0.get() })
    }
}

pub(crate) fn set_message(args: fmt::Arguments<'_>) {
    store::with(|m| m.set(args));
}

pub(crate) fn clear_message() {
    store::with(|m| m.set(format_args!("")));
}

/// Runs one entry point: catches a panic (with `std`), records the message of an error and
/// returns the status.
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> SarStatus {
    #[cfg(feature = "std")]
    let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| {
                    payload
                        .downcast_ref::<std::string::String>()
                        .map(|s| s.as_str())
                })
                .unwrap_or("(no message)");
            set_message(format_args!("panic inside sar-capi: {text}"));
            return SarStatus::SarErrPanic;
        }
    };
    #[cfg(not(feature = "std"))]
    let result = f();
    match result {
        Ok(()) => {
            clear_message();
            SarStatus::SarOk
        }
        Err(e) => {
            set_message(format_args!("{e}"));
            e.status()
        }
    }
}

/// The message of the last failed call on this thread (with `std`; the last failed call at all
/// without it): a NUL-terminated UTF-8 string, empty after a successful call. The pointer stays
/// valid until the next call into sar-capi on the same thread.
#[no_mangle]
pub extern "C" fn sar_last_error_message() -> *const core::ffi::c_char {
    store::with(|m| m.buf.as_ptr().cast())
}

/// A static NUL-terminated name of a status code ("SAR_OK", "SAR_ERR_LABEL", …).
#[no_mangle]
pub extern "C" fn sar_status_name(status: i32) -> *const core::ffi::c_char {
    let s: &'static [u8] = match status {
        0 => b"SAR_OK\0",
        1 => b"SAR_ERR_NULL_POINTER\0",
        2 => b"SAR_ERR_LENGTH\0",
        3 => b"SAR_ERR_SHAPE\0",
        4 => b"SAR_ERR_OVERFLOW\0",
        5 => b"SAR_ERR_LABEL\0",
        6 => b"SAR_ERR_PARAM\0",
        7 => b"SAR_ERR_NON_FINITE\0",
        8 => b"SAR_ERR_CAPACITY\0",
        9 => b"SAR_ERR_PANIC\0",
        _ => b"SAR_UNKNOWN_STATUS\0",
    };
    s.as_ptr().cast()
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> std::string::String {
        // SAFETY: the pointer is a NUL-terminated buffer of this thread.
        unsafe { CStr::from_ptr(sar_last_error_message()) }
            .to_str()
            .unwrap()
            .into()
    }

    #[test]
    fn panic_is_caught_and_named() {
        let s = guard(|| panic!("boom"));
        assert_eq!(s, SarStatus::SarErrPanic);
        assert_eq!(last(), "panic inside sar-capi: boom");
        assert_eq!(guard(|| Ok(())), SarStatus::SarOk);
        assert_eq!(last(), "");
    }

    #[test]
    fn long_messages_are_cut_on_a_character() {
        set_message(format_args!("{}", "é".repeat(400)));
        let m = last();
        assert!(m.len() < SAR_MESSAGE_CAPACITY && m.chars().all(|c| c == 'é'));
    }
}
