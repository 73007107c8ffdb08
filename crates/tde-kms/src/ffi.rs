//! The C ABI the key worker calls, and the signal mask.  The only module
//! with `unsafe`.
//!
//! ```c
//! uint32_t tde_kms_abi_version(void);            /* 1 */
//! int32_t  tde_kms_call(const uint8_t *req, size_t req_len,
//!                       const uint8_t *input, size_t input_len,
//!                       uint8_t *out, size_t out_cap, size_t *out_len,
//!                       uint8_t *msg, size_t msg_cap, size_t *msg_len);
//! ```
//!
//! `tde_kms_call` returns 0, or a `Failure` code (1..=8) with the error's
//! text in `msg`.  It never unwinds into C (a panic is code 8, "internal
//! error in the provider library"), and it blocks every signal in the
//! calling thread while it runs, restoring the caller's mask on return.

use crate::worker::{self, Output};
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tde_core::provider::Failure;
use zeroize::Zeroize;

/// The version of this ABI; bumped on any change to the functions' meaning.
pub const ABI_VERSION: u32 = 1;

#[no_mangle]
pub extern "C" fn tde_kms_abi_version() -> u32 {
    ABI_VERSION
}

/// Runs one request (see the crate documentation for its JSON).
///
/// Returns 0 on success, else a `tde_core::provider::Failure` code (1..=8).
///
/// # Safety
///
/// Each pointer/length pair must describe memory valid for that many bytes
/// (readable for `req` and `input`, writable for `out` and `msg`), or the
/// pointer may be null with a zero length.  `out_len` and `msg_len` must be
/// null or valid for a write of one `usize`.  The buffers must not overlap.
#[no_mangle]
pub unsafe extern "C" fn tde_kms_call(
    req: *const u8,
    req_len: usize,
    input: *const u8,
    input_len: usize,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
    msg: *mut u8,
    msg_cap: usize,
    msg_len: *mut usize,
) -> i32 {
    let _mask = SignalMask::block_all();
    // SAFETY: the caller gives a valid-or-null `out_len`/`msg_len` (see above).
    unsafe {
        put_len(out_len, 0);
        put_len(msg_len, 0);
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller gives `req`/`input` valid for their lengths, or null.
        let (req, input) = unsafe { (slice(req, req_len), slice(input, input_len)) };
        worker::call(req, input)
    }));
    let (code, text) = match result {
        Ok(Ok(output)) => match copy_out(&output, out, out_cap) {
            Ok(()) => {
                // SAFETY: as above.
                unsafe { put_len(out_len, output.bytes().len()) };
                drop_output(output);
                return 0;
            }
            Err(why) => {
                drop_output(output);
                (Failure::Other.code(), why)
            }
        },
        Ok(Err(e)) => (Failure::of(&e).code(), e.to_string()),
        Err(_) => (Failure::Other.code(), "internal error in the provider library".to_string()),
    };
    let n = truncated_len(&text, msg_cap);
    if n > 0 && !msg.is_null() {
        // SAFETY: `msg` is writable for `msg_cap >= n` bytes and does not
        // overlap `text`, which we own.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), msg, n) };
        // SAFETY: as above.
        unsafe { put_len(msg_len, n) };
    }
    code
}

/// Copies the output into the caller's buffer, or says why it cannot.
fn copy_out(output: &Output, out: *mut u8, out_cap: usize) -> Result<(), String> {
    let bytes = output.bytes();
    if bytes.len() > out_cap {
        return Err(format!(
            "the provider's output ({} bytes) does not fit the caller's buffer ({out_cap} bytes)",
            bytes.len()
        ));
    }
    if bytes.is_empty() {
        return Ok(());
    }
    if out.is_null() {
        return Err("the caller's output buffer is null".to_string());
    }
    // SAFETY: the caller gives `out` writable for `out_cap >= bytes.len()`
    // bytes, not overlapping our output, which we own.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out, bytes.len()) };
    Ok(())
}

/// Wipes what we produced once it is copied (a `WrapKey` wipes itself).
fn drop_output(output: Output) {
    if let Output::Blob(mut b) = output {
        b.zeroize();
    }
}

/// The longest prefix of `text` that fits in `cap` bytes and ends on a char
/// boundary.
fn truncated_len(text: &str, cap: usize) -> usize {
    if text.len() <= cap {
        return text.len();
    }
    (0..=cap).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0)
}

/// # Safety
/// `ptr` must be null or valid for reads of `len` bytes for the call.
unsafe fn slice<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: non-null and valid for `len` bytes, per the caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// # Safety
/// `p` must be null or valid for a write of one `usize`.
unsafe fn put_len(p: *mut usize, n: usize) {
    if !p.is_null() {
        // SAFETY: non-null and valid for the write, per the caller.
        unsafe { p.write(n) };
    }
}

fn full_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises the whole set it is given; it cannot
    // fail for a valid pointer.
    unsafe {
        libc::sigfillset(set.as_mut_ptr());
        set.assume_init()
    }
}

/// Blocks every signal in the calling thread, for good: the runtime's
/// threads call this first thing, so PostgreSQL's signals (SIGTERM, SIGHUP,
/// SIGUSR1, ...) only ever reach the key worker's own thread.
pub(crate) fn block_all_signals_in_this_thread() {
    let set = full_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Every signal blocked in this thread until dropped, then the old mask
/// back.  Threads started meanwhile inherit the blocked mask.
struct SignalMask {
    old: libc::sigset_t,
}

impl SignalMask {
    fn block_all() -> SignalMask {
        let set = full_set();
        let mut old = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `set` is initialised and `old` is valid for the write;
        // pthread_sigmask with SIG_BLOCK and valid pointers cannot fail, and
        // fills `old` with the previous mask.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, old.as_mut_ptr());
            SignalMask { old: old.assume_init() }
        }
    }
}

impl Drop for SignalMask {
    fn drop(&mut self) {
        // SAFETY: `old` is the mask pthread_sigmask filled in `block_all`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current_mask_blocks(sig: i32) -> bool {
        let mut cur = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: a null new set only reads the mask into `cur`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), cur.as_mut_ptr());
            libc::sigismember(cur.as_ptr(), sig) == 1
        }
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncated_len("héllo", 100), 6);
        assert_eq!(truncated_len("héllo", 2), 1);
        assert_eq!(truncated_len("héllo", 3), 3);
        assert_eq!(truncated_len("héllo", 0), 0);
    }

    #[test]
    fn mask_is_blocked_during_and_restored_after() {
        std::thread::spawn(|| {
            assert!(!current_mask_blocks(libc::SIGUSR1));
            {
                let _m = SignalMask::block_all();
                assert!(current_mask_blocks(libc::SIGUSR1) && current_mask_blocks(libc::SIGTERM));
                let child = std::thread::spawn(|| current_mask_blocks(libc::SIGHUP)).join().unwrap();
                assert!(child, "a thread started during the call inherits the blocked mask");
            }
            assert!(!current_mask_blocks(libc::SIGUSR1));
        })
        .join()
        .unwrap();
    }

    fn call(req: &str, input: &[u8], out_cap: usize, msg_cap: usize) -> (i32, Vec<u8>, String) {
        let mut out = vec![0u8; out_cap];
        let mut msg = vec![0u8; msg_cap];
        let (mut out_len, mut msg_len) = (usize::MAX, usize::MAX);
        // SAFETY: every buffer is valid for its length.
        let rc = unsafe {
            tde_kms_call(
                req.as_ptr(),
                req.len(),
                input.as_ptr(),
                input.len(),
                out.as_mut_ptr(),
                out.len(),
                &mut out_len,
                msg.as_mut_ptr(),
                msg.len(),
                &mut msg_len,
            )
        };
        out.truncate(out_len);
        msg.truncate(msg_len);
        (rc, out, String::from_utf8(msg).unwrap())
    }

    #[test]
    fn the_c_entry_point_round_trips_and_reports() {
        use base64::engine::general_purpose::STANDARD as B64;
        use base64::Engine as _;
        assert_eq!(tde_kms_abi_version(), 1);
        std::env::set_var("TDE_KMS_UNIT_FFI_KEY", B64.encode([3u8; 32]));
        let req = |op: &str| {
            format!(
                r#"{{"op":"{op}","kind":"env","options":{{"variable":"TDE_KMS_UNIT_FFI_KEY"}},"key":"k","aad":"YQ=="}}"#
            )
        };
        let kek = [5u8; 32];
        let (rc, blob, msg) = call(&req("wrap"), &kek, 256, 256);
        assert_eq!((rc, msg.as_str()), (0, ""));
        let (rc, back, _) = call(&req("unwrap"), &blob, 32, 256);
        assert_eq!((rc, back.as_slice()), (0, &kek[..]));
        // too small an output buffer
        let (rc, out, msg) = call(&req("unwrap"), &blob, 31, 256);
        assert_eq!(rc, Failure::Other.code());
        assert!(out.is_empty() && msg.contains("does not fit"), "{msg}");
        // wrong associated data
        let other = req("unwrap").replace("YQ==", "Yg==");
        let (rc, _, msg) = call(&other, &blob, 32, 256);
        assert_eq!(rc, Failure::WrongKey.code(), "{msg}");
        // bad request, message truncated to the buffer
        let (rc, _, msg) = call("{", &[], 0, 10);
        assert_eq!((rc, msg.len()), (Failure::BadOptions.code(), 10));
        // null pointers with zero lengths
        // SAFETY: null pointers with zero lengths are allowed.
        let rc = unsafe {
            tde_kms_call(
                std::ptr::null(),
                0,
                std::ptr::null(),
                0,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, Failure::BadOptions.code());
    }

    #[test]
    fn a_panic_is_code_8() {
        let (rc, out, msg) = call(r#"{"op":"probe","kind":"tde-kms-test-panic"}"#, &[], 32, 256);
        assert_eq!((rc, out.len(), msg.as_str()), (8, 0, "internal error in the provider library"));
        // and the signal mask is restored after the unwind
        assert!(!current_mask_blocks(libc::SIGUSR2));
    }
}
