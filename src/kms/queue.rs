//! The request slots between key provider users and the key worker, in
//! shared memory.
//!
//! Why it exists: backends and the startup process need wraps and unwraps
//! from a key provider, but only the key worker (worker.rs) may talk to one.
//! A requester claims a free slot, writes its request and sets the worker's
//! latch; the worker takes the request, runs it and sets the requester's
//! latch.  Each slot goes through these states, every transition a
//! compare-and-swap on `state`, so exactly one process owns the slot's
//! other fields at any time:
//!
//! ```text
//!   FREE --requester--> CLAIMED --requester--> POSTED --worker--> TAKEN --worker--> DONE --requester--> FREE
//!                                                 |                 |
//!                                    requester gives up     requester gives up
//!                                        (-> FREE)            (-> ABANDONED --worker--> FREE)
//! ```
//!
//! A requester gives up after `tde.provider_timeout`, on a query cancel, or
//! when the worker that took its request has exited (the postmaster starts
//! a new one, which serves requests still POSTED).  It never waits longer.
//!
//! Key material crosses a slot in one direction and is wiped right after:
//! a KEK to be wrapped by the worker once it has copied it, an unwrapped
//! KEK by the requester once it has copied it (or by the worker, if the
//! requester gave up).  The region is locked in memory and left out of
//! core dumps like the key table.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use tde_core::provider::Failure;
use zeroize::{Zeroize, Zeroizing};

/// Requests in flight at once (more wait for a free slot, within their timeout).
const SLOTS: usize = 16;
/// Largest request (JSON: kind, options, key name, associated data).
pub const REQUEST_MAX: usize = 4096;
/// Largest key material or wrapped blob in either direction.
pub const DATA_MAX: usize = 4096;
const MESSAGE_MAX: usize = 1024;

const FREE: u32 = 0;
const CLAIMED: u32 = 1;
const POSTED: u32 = 2;
const TAKEN: u32 = 3;
const DONE: u32 = 4;
const ABANDONED: u32 = 5;

/// Outcome of the key worker's last attempt to unlock the key store.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UnlockResult {
    /// No attempt has finished since the key store was loaded.
    Pending = 0,
    Unlocked = 1,
    /// The provider did not give the key (down, refused): retried.
    Locked = 2,
    /// The key store is not authentic under the master key: never retried.
    Refused = 3,
}

#[repr(C)]
struct Slot {
    state: AtomicU32,
    /// pid of the worker that took the request.
    taken_by: AtomicI32,
    /// When the worker answered (ms since the epoch), for `reap`.
    done_at_ms: AtomicU64,
    /// Owned by whoever owns the state (module comment).
    body: std::cell::UnsafeCell<Body>,
}

#[repr(C)]
struct Body {
    /// The requester's latch (a PGPROC's, in shared memory).
    requester_latch: usize,
    timeout_ms: u32,
    request_len: u32,
    input_len: u32,
    output_len: u32,
    message_len: u32,
    code: i32,
    request: [u8; REQUEST_MAX],
    input: [u8; DATA_MAX],
    output: [u8; DATA_MAX],
    message: [u8; MESSAGE_MAX],
}

#[repr(C)]
struct Header {
    /// pid of the running key worker, 0 if none.
    worker_pid: AtomicI32,
    worker_latch: AtomicUsize,
    /// Someone waits for an unlock attempt.
    unlock_wanted: AtomicU32,
    /// Unlock attempts finished since the key store was loaded, and the last one's result.
    unlock_attempts: AtomicU64,
    unlock_result: AtomicU32,
    /// When the last attempt finished (ms since the epoch).
    unlock_at_ms: AtomicU64,
    slots: [Slot; SLOTS],
}

static mut HEADER: *mut Header = std::ptr::null_mut();

pub fn size() -> usize {
    std::mem::size_of::<Header>()
}

/// Called from the shmem_request hook.
pub fn request() {
    // SAFETY: called in the postmaster's shmem_request_hook.
    unsafe { pg_sys::RequestAddinShmemSpace(size()) };
}

/// Called from the shmem_startup hook (postmaster, and after a crash restart).
pub fn attach() {
    let mut found = false;
    // SAFETY: ShmemInitStruct with AddinShmemInitLock held, as PostgreSQL
    // requires; the region has the size requested above.  Zero bytes are a
    // valid Header (all slots FREE, no worker).
    unsafe {
        let addin_lock = crate::pg::addin_shmem_init_lock();
        pg_sys::LWLockAcquire(addin_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let ptr = pg_sys::ShmemInitStruct(c"tde key worker".as_ptr(), size(), &mut found) as *mut Header;
        if !found {
            std::ptr::write_bytes(ptr as *mut u8, 0, size());
            crate::keys::protect_region(ptr as *mut u8, size(), "the key worker's request slots");
        }
        HEADER = ptr;
        pg_sys::LWLockRelease(addin_lock);
    }
}

fn header() -> Option<&'static Header> {
    // SAFETY: set once in attach() in the postmaster, before any child was
    // forked; the fields shared between processes are atomics, the others
    // are accessed only by the process that owns the slot (module comment).
    unsafe { HEADER.as_ref() }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn my_latch() -> usize {
    // SAFETY: plain read of a process global set at process start.
    unsafe { pg_sys::MyLatch as usize }
}

fn set_latch(latch: usize) {
    if latch != 0 {
        // SAFETY: the pointer is a PGPROC's latch in shared memory, which
        // stays valid (the PGPROC may have been reused: then a process is
        // woken for nothing, which latches allow).
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// Sleeps on this process's latch for at most `d`, waking for interrupts;
/// a dead postmaster ends the process.
fn sleep(d: Duration) {
    let ms = d.as_millis().clamp(1, 1000) as std::ffi::c_long;
    // SAFETY: the standard latch wait of a process with a latch.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// What a request gives back.
pub type Reply = Result<Zeroizing<Vec<u8>>, (Failure, String)>;

/// A claimed slot; gives the request up if dropped before the answer was
/// read (a timeout, or an ERROR such as a query cancel unwinding through).
struct Claim {
    slot: &'static Slot,
    done: bool,
}

impl Claim {
    fn slot_mut(&self) -> *mut Body {
        self.slot.body.get()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let s = self.slot;
        // Not taken yet: withdraw it.  Taken: the worker frees it when done.
        // Already answered: wipe and free it here.
        if s.state.compare_exchange(POSTED, CLAIMED, Ordering::AcqRel, Ordering::Acquire).is_ok()
            || s.state.compare_exchange(DONE, CLAIMED, Ordering::AcqRel, Ordering::Acquire).is_ok()
            || s.state.load(Ordering::Acquire) == CLAIMED
        {
            // SAFETY: CLAIMED: this process owns the slot's fields.
            unsafe { wipe(self.slot_mut()) };
            s.state.store(FREE, Ordering::Release);
        } else {
            let _ = s.state.compare_exchange(TAKEN, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// Clears a slot's key material and lengths.
///
/// # Safety
/// The caller owns the slot (CLAIMED, TAKEN or ABANDONED by the worker).
unsafe fn wipe(s: *mut Body) {
    // SAFETY: the caller owns the slot's non-atomic fields.
    let s = unsafe { &mut *s };
    s.input.zeroize();
    s.output.zeroize();
    s.request[..s.request_len as usize].zeroize();
    s.request_len = 0;
    s.input_len = 0;
    s.output_len = 0;
    s.message_len = 0;
}

/// Sends `request` (JSON) with `input` to the key worker and waits for the
/// answer, at most `timeout`.
pub fn call(request: &[u8], input: &[u8], timeout: Duration) -> Reply {
    let Some(h) = header() else {
        return Err((Failure::Other, "the key worker's shared memory is not set up".into()));
    };
    if request.len() > REQUEST_MAX || input.len() > DATA_MAX {
        return Err((
            Failure::BadOptions,
            format!("the request is too large for the key worker (options over {REQUEST_MAX} bytes)"),
        ));
    }
    let deadline = Instant::now() + timeout;
    let claim = loop {
        if let Some(slot) = h
            .slots
            .iter()
            .find(|s| s.state.compare_exchange(FREE, CLAIMED, Ordering::AcqRel, Ordering::Relaxed).is_ok())
        {
            break Claim { slot, done: false };
        }
        if Instant::now() >= deadline {
            return Err((
                Failure::TimedOut,
                format!("all {SLOTS} request slots of the key worker stayed busy for tde.provider_timeout"),
            ));
        }
        sleep(Duration::from_millis(10));
        pgrx::check_for_interrupts!();
    };
    // SAFETY: CLAIMED: this process owns the slot's fields until it posts it.
    unsafe {
        let s = &mut *claim.slot_mut();
        s.request[..request.len()].copy_from_slice(request);
        s.request_len = request.len() as u32;
        s.input[..input.len()].copy_from_slice(input);
        s.input_len = input.len() as u32;
        s.requester_latch = my_latch();
        s.timeout_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        s.code = 0;
    }
    claim.slot.state.store(POSTED, Ordering::Release);
    set_latch(h.worker_latch.load(Ordering::Acquire));
    wait_answer(h, claim, deadline)
}

fn wait_answer(h: &Header, mut claim: Claim, deadline: Instant) -> Reply {
    let s = claim.slot;
    loop {
        match s.state.load(Ordering::Acquire) {
            DONE => {
                // Ours again (a slot left DONE for long is reaped by the worker).
                if s.state.compare_exchange(DONE, CLAIMED, Ordering::AcqRel, Ordering::Acquire).is_err() {
                    continue;
                }
                // SAFETY: CLAIMED: the worker has handed the slot back to us.
                let reply = unsafe {
                    let m = &mut *claim.slot_mut();
                    let reply = if m.code == 0 {
                        Ok(Zeroizing::new(m.output[..m.output_len as usize].to_vec()))
                    } else {
                        let text = String::from_utf8_lossy(&m.message[..m.message_len as usize]).into_owned();
                        Err((Failure::from_code(m.code), text))
                    };
                    wipe(m);
                    reply
                };
                claim.done = true;
                s.state.store(FREE, Ordering::Release);
                return reply;
            }
            TAKEN => {
                let by = s.taken_by.load(Ordering::Acquire);
                if by != h.worker_pid.load(Ordering::Acquire) {
                    // The worker that took it has exited; nobody will answer.
                    if s.state.compare_exchange(TAKEN, CLAIMED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                        return Err((
                            Failure::Other,
                            "the key worker exited while handling the request (see the server log); retry".into(),
                        ));
                    }
                    continue;
                }
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            let taken = s.state.load(Ordering::Acquire) == TAKEN;
            drop(claim);
            return Err((
                Failure::TimedOut,
                if taken {
                    "the key provider did not answer within tde.provider_timeout".into()
                } else if h.worker_pid.load(Ordering::Acquire) == 0 {
                    "the key worker is not running (it starts with the server; see the server log)".into()
                } else {
                    "the key worker did not take the request within tde.provider_timeout (busy with another provider call?)"
                        .into()
                },
            ));
        }
        sleep(deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)));
        // A cancel raises here; dropping the claim withdraws the request.
        pgrx::check_for_interrupts!();
    }
}

/// One request as the worker sees it.
pub struct Taken {
    slot: &'static Slot,
    pub request: Vec<u8>,
    pub input: Zeroizing<Vec<u8>>,
    pub timeout: Duration,
}

/// The worker: announces itself, so requesters can wake it and tell a dead
/// worker from a busy one.
pub fn worker_started(pid: i32) {
    if let Some(h) = header() {
        h.worker_latch.store(my_latch(), Ordering::Release);
        h.worker_pid.store(pid, Ordering::Release);
    }
}

/// The worker is exiting: requesters of what it took stop waiting.
pub fn worker_exiting() {
    if let Some(h) = header() {
        h.worker_pid.store(0, Ordering::Release);
        h.worker_latch.store(0, Ordering::Release);
        wake_requesters(h);
    }
}

/// The worker: takes the next posted request, if any.
pub fn take(pid: i32) -> Option<Taken> {
    let h = header()?;
    for slot in &h.slots {
        if slot.state.load(Ordering::Acquire) != POSTED {
            continue;
        }
        slot.taken_by.store(pid, Ordering::Release);
        if slot.state.compare_exchange(POSTED, TAKEN, Ordering::AcqRel, Ordering::Acquire).is_err() {
            continue;
        }
        // SAFETY: TAKEN: the worker owns the slot's fields until DONE.
        let t = unsafe {
            let s = &mut *slot.body.get();
            let input = Zeroizing::new(s.input[..s.input_len as usize].to_vec());
            s.input.zeroize();
            Taken {
                slot,
                request: s.request[..s.request_len as usize].to_vec(),
                input,
                timeout: Duration::from_millis(s.timeout_ms.max(1) as u64),
            }
        };
        return Some(t);
    }
    None
}

/// The worker: answers a request it took.
pub fn answer(t: Taken, reply: Reply) {
    let slot = t.slot;
    let s = slot.body.get();
    if slot.state.load(Ordering::Acquire) == ABANDONED {
        // SAFETY: ABANDONED: the requester left; the worker owns the slot.
        unsafe { wipe(s) };
        slot.state.store(FREE, Ordering::Release);
        return;
    }
    // SAFETY: TAKEN: the worker owns the slot's fields until DONE.
    let latch = unsafe {
        let m = &mut *s;
        match &reply {
            Ok(out) if out.len() <= DATA_MAX => {
                m.output[..out.len()].copy_from_slice(out);
                m.output_len = out.len() as u32;
                m.code = 0;
            }
            Ok(_) => put_message(m, Failure::Other, "the provider's answer is too large"),
            Err((f, text)) => put_message(m, *f, text),
        }
        m.requester_latch
    };
    slot.done_at_ms.store(now_ms(), Ordering::Release);
    if slot.state.compare_exchange(TAKEN, DONE, Ordering::AcqRel, Ordering::Acquire).is_ok() {
        set_latch(latch);
    } else {
        // Abandoned meanwhile.
        // SAFETY: ABANDONED: the worker owns the slot.
        unsafe { wipe(s) };
        slot.state.store(FREE, Ordering::Release);
    }
}

/// The worker: frees answers nobody collected.  A requester polls its slot
/// at least every 100 ms while it waits, and one that gives up withdraws or
/// abandons its request; an answer left for longer than `grace` belongs to
/// a process that exited without unwinding (a FATAL, such as
/// pg_terminate_backend, while it waited), and would hold its slot forever.
pub fn reap(grace: Duration) {
    let Some(h) = header() else { return };
    let now = now_ms();
    for slot in &h.slots {
        if slot.state.load(Ordering::Acquire) == DONE
            && now.saturating_sub(slot.done_at_ms.load(Ordering::Acquire)) > grace.as_millis() as u64
            && slot.state.compare_exchange(DONE, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            // SAFETY: ABANDONED by the worker: it owns the slot.
            unsafe { wipe(slot.body.get()) };
            slot.state.store(FREE, Ordering::Release);
        }
    }
}

fn put_message(m: &mut Body, f: Failure, text: &str) {
    let mut n = text.len().min(MESSAGE_MAX);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    m.message[..n].copy_from_slice(&text.as_bytes()[..n]);
    m.message_len = n as u32;
    m.output_len = 0;
    m.code = if f.code() == 0 { Failure::Other.code() } else { f.code() };
}

// ---- Unlocking the key store -------------------------------------------

/// The key store was (re)loaded: no unlock attempt has finished yet.
pub fn reset_unlock() {
    if let Some(h) = header() {
        h.unlock_result.store(UnlockResult::Pending as u32, Ordering::Release);
        h.unlock_at_ms.store(0, Ordering::Release);
    }
}

/// Asks the worker for an unlock attempt.
pub fn want_unlock() {
    if let Some(h) = header() {
        h.unlock_wanted.store(1, Ordering::Release);
        set_latch(h.worker_latch.load(Ordering::Acquire));
    }
}

/// The worker: whether someone asked for an attempt (and clears the ask).
pub fn unlock_asked() -> bool {
    header().is_some_and(|h| h.unlock_wanted.swap(0, Ordering::AcqRel) != 0)
}

/// The worker: an attempt finished.
pub fn unlock_done(r: UnlockResult) {
    if let Some(h) = header() {
        h.unlock_result.store(r as u32, Ordering::Release);
        h.unlock_at_ms.store(now_ms(), Ordering::Release);
        h.unlock_attempts.fetch_add(1, Ordering::AcqRel);
        wake_requesters(h);
    }
}

/// The last attempt: (finished attempts, result, ms since it finished).
pub fn unlock_status() -> (u64, UnlockResult, u64) {
    let Some(h) = header() else { return (0, UnlockResult::Pending, 0) };
    let r = match h.unlock_result.load(Ordering::Acquire) {
        1 => UnlockResult::Unlocked,
        2 => UnlockResult::Locked,
        3 => UnlockResult::Refused,
        _ => UnlockResult::Pending,
    };
    let at = h.unlock_at_ms.load(Ordering::Acquire);
    (h.unlock_attempts.load(Ordering::Acquire), r, now_ms().saturating_sub(at))
}

/// Waits until an attempt after `attempts` has finished, or `timeout`.
pub fn wait_unlock_attempt(attempts: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if unlock_status().0 > attempts {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(50)));
        pgrx::check_for_interrupts!();
    }
}

/// What tde_key_worker() shows: the worker's pid (0: none), requests
/// waiting for it, requests it is running, answers not yet collected.
pub fn status() -> (i32, u32, u32, u32) {
    let Some(h) = header() else { return (0, 0, 0, 0) };
    let (mut posted, mut taken, mut done) = (0, 0, 0);
    for s in &h.slots {
        match s.state.load(Ordering::Acquire) {
            POSTED => posted += 1,
            TAKEN | ABANDONED => taken += 1,
            DONE => done += 1,
            _ => {}
        }
    }
    (h.worker_pid.load(Ordering::Acquire), posted, taken, done)
}

/// Wakes every process that may be waiting on a slot (it checks its own).
fn wake_requesters(h: &Header) {
    for s in &h.slots {
        if s.state.load(Ordering::Acquire) != FREE {
            // SAFETY: a racy read of a word-sized latch pointer, which its
            // owner writes before posting; a stale value wakes someone for
            // nothing.
            set_latch(unsafe { std::ptr::read_volatile(&(*s.body.get()).requester_latch) });
        }
    }
}
