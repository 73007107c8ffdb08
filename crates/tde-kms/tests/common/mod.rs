//! Helpers shared by the integration tests (each runs against a real server
//! on loopback, named by environment variables; see the test files).

#![allow(dead_code)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tde_core::provider::{Failure, ProviderError};

/// The environment variable's value, or `None` (the test then says so and
/// passes: these tests are `#[ignore]`d and run by hand).
pub fn env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("{name} is not set; skipping");
            None
        }
    }
}

/// A name no earlier run used.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

pub fn failure(e: &ProviderError) -> Failure {
    Failure::of(e)
}

#[track_caller]
pub fn assert_failure<T>(r: Result<T, ProviderError>, want: Failure) -> String {
    match r {
        Ok(_) => panic!("succeeded, expected {want:?}"),
        Err(e) => {
            assert_eq!(Failure::of(&e), want, "{e}");
            e.to_string()
        }
    }
}

/// Runs `f` and checks it ended within `limit` (plus scheduling slack).
#[track_caller]
pub fn within<T>(limit: Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    let took = t.elapsed();
    assert!(took <= limit + Duration::from_millis(1500), "took {took:?}, limit {limit:?}");
    r
}

/// A TCP port that accepts connections (into its backlog) and never answers.
pub fn silent_port() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A loopback port with nothing listening.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

/// Calls `tde_kms_call` as the key worker does.
pub fn ffi_call(req: &str, input: &[u8]) -> (i32, Vec<u8>, String) {
    let mut out = vec![0u8; 4096];
    let mut msg = vec![0u8; 4096];
    let (mut out_len, mut msg_len) = (0usize, 0usize);
    // SAFETY: every buffer is valid for the length given with it.
    let rc = unsafe {
        tde_kms::tde_kms_call(
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

/// A plain HTTP/1.1 request to a loopback server (for test set-up only):
/// returns the status and the body.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let hostport = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
