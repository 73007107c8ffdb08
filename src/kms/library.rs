//! The remote providers' library, `$libdir/tde_kms.so`, loaded by the key
//! worker alone.
//!
//! Why a second library: the AWS, Google and Azure SDKs, Vault's client, a
//! TLS stack and an async runtime are most of a KMS client's code.  Linked
//! into tde.so they would be mapped into every backend; here only the key
//! worker `dlopen`s them, on its first remote request, so no other process
//! carries them (TAP 019 checks the backends' memory maps).  The boundary is
//! one C function, `tde_kms_call` (crates/tde-kms/src/ffi.rs): a JSON
//! request without secrets, key material in separate byte buffers.

use std::ffi::{c_void, CStr, CString};
use std::sync::OnceLock;

use tde_core::provider::Failure;
use zeroize::Zeroizing;

use super::queue::{Reply, DATA_MAX};

type CallFn = unsafe extern "C" fn(
    *const u8,
    usize,
    *const u8,
    usize,
    *mut u8,
    usize,
    *mut usize,
    *mut u8,
    usize,
    *mut usize,
) -> i32;
type VersionFn = unsafe extern "C" fn() -> u32;

const ABI_VERSION: u32 = 1;

struct Library {
    call: CallFn,
}

// SAFETY: the function pointer stays valid for the life of the process (the
// library is never closed); the worker is single-threaded anyway.
unsafe impl Send for Library {}
// SAFETY: as above.
unsafe impl Sync for Library {}

static LIBRARY: OnceLock<Result<Library, String>> = OnceLock::new();

/// `$libdir/tde_kms.so`.
pub fn path() -> String {
    // SAFETY: pkglib_path is a NUL-terminated array filled at process start.
    let dir = unsafe { CStr::from_ptr((&raw const pgrx::pg_sys::pkglib_path).cast()) };
    format!("{}/tde_kms.so", dir.to_string_lossy())
}

fn load() -> Result<Library, String> {
    let p = path();
    let c = CString::new(p.clone()).map_err(|_| "bad library path".to_string())?;
    // SAFETY: dlopen with a NUL-terminated path; RTLD_LOCAL keeps its
    // symbols out of the global namespace, so nothing else binds to them.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local message or NULL.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!(
            "the remote key providers' library \"{p}\" could not be loaded ({why}); install it with the extension"
        ));
    }
    let sym = |name: &CStr| -> Result<*mut c_void, String> {
        // SAFETY: dlsym on a live handle with a NUL-terminated name.
        let f = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if f.is_null() {
            Err(format!("\"{p}\" has no symbol {}", name.to_string_lossy()))
        } else {
            Ok(f)
        }
    };
    let version = sym(c"tde_kms_abi_version")?;
    // SAFETY: the symbol is the library's `extern "C" fn() -> u32`.
    let v = unsafe { std::mem::transmute::<*mut c_void, VersionFn>(version)() };
    if v != ABI_VERSION {
        return Err(format!("\"{p}\" speaks ABI version {v}, tde.so needs {ABI_VERSION}; install matching versions"));
    }
    let call = sym(c"tde_kms_call")?;
    // SAFETY: the symbol has the signature `CallFn` (crates/tde-kms/src/ffi.rs, ABI 1).
    Ok(Library { call: unsafe { std::mem::transmute::<*mut c_void, CallFn>(call) } })
}

/// Runs one request in the library (loading it on first use).
pub fn call(request: &[u8], input: &[u8]) -> Reply {
    let lib = match LIBRARY.get_or_init(load) {
        Ok(l) => l,
        Err(e) => return Err((Failure::BadOptions, e.clone())),
    };
    let mut out = Zeroizing::new(vec![0u8; DATA_MAX]);
    let mut msg = vec![0u8; 1024];
    let (mut out_len, mut msg_len) = (0usize, 0usize);
    // SAFETY: every pointer is valid for the length passed with it; the
    // library writes at most out.len() / msg.len() bytes and sets the lengths.
    let rc = unsafe {
        (lib.call)(
            request.as_ptr(),
            request.len(),
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
    if rc == 0 {
        out.truncate(out_len.min(DATA_MAX));
        Ok(out)
    } else {
        msg.truncate(msg_len.min(1024));
        Err((Failure::from_code(rc), String::from_utf8_lossy(&msg).into_owned()))
    }
}
