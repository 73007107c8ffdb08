//! Progress of re-encryption passes, in shared memory: what the view
//! `tde_reencryption_progress` shows, and the pause flag that
//! `tde_reencrypt_pause()` / `tde_reencrypt_resume()` set.
//!
//! Why in shared memory and not in the key store: progress is for watching
//! and pausing, never for correctness -- which key a page uses comes from
//! the page itself (pd_flags), and an interrupted pass is finished by
//! running it again.  So nothing here is WAL-logged or survives a restart.
//!
//! One slot per relation file of a running pass; a pass takes its slots at
//! the start and frees them at the end (also when it fails: `Slots` frees
//! them on drop).  Locking: one LWLock of its own tranche, held only to
//! copy a few fields.

use std::ffi::CStr;

use pgrx::pg_sys;

const TRANCHE: &CStr = c"tde progress";
const SLOTS: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum State {
    Waiting = 1,
    Running = 2,
    Paused = 3,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Running => "running",
            State::Paused => "paused",
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    /// 0: free; otherwise a State.
    state: u32,
    pause: u32,
    pid: i32,
    db: pg_sys::Oid,
    table: pg_sys::Oid,
    rel: pg_sys::Oid,
    fork: i32,
    target_version: u32,
    blocks_done: u64,
    blocks_total: u64,
    started_at: i64,
}

/// One row of the view.
pub struct Row {
    pub db: pg_sys::Oid,
    pub table: pg_sys::Oid,
    pub rel: pg_sys::Oid,
    pub fork: i32,
    pub target_version: u32,
    pub blocks_done: u64,
    pub blocks_total: u64,
    pub state: State,
    pub started_at: i64,
    pub pid: i32,
}

static mut SLOT_ARRAY: *mut Slot = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();

fn size() -> usize {
    SLOTS * std::mem::size_of::<Slot>()
}

/// From the shmem_request hook.
pub fn request() {
    // SAFETY: called in the postmaster's shmem_request_hook.
    unsafe {
        pg_sys::RequestAddinShmemSpace(size());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
    }
}

/// From the shmem_startup hook.
pub fn attach() {
    let mut found = false;
    // SAFETY: ShmemInitStruct and GetNamedLWLockTranche with
    // AddinShmemInitLock held, for the size requested above.
    unsafe {
        let addin_lock = crate::pg::addin_shmem_init_lock();
        pg_sys::LWLockAcquire(addin_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let ptr = pg_sys::ShmemInitStruct(c"tde re-encryption progress".as_ptr(), size(), &mut found) as *mut Slot;
        if !found {
            std::ptr::write_bytes(ptr as *mut u8, 0, size());
        }
        SLOT_ARRAY = ptr;
        LOCK = &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock;
        pg_sys::LWLockRelease(addin_lock);
    }
}

/// Runs `f` on the slots with the lock held (exclusively if `write`).
fn with_slots<R>(write: bool, f: impl FnOnce(&mut [Slot]) -> R) -> R {
    let mode = if write { pg_sys::LWLockMode::LW_EXCLUSIVE } else { pg_sys::LWLockMode::LW_SHARED };
    // SAFETY: the lock and the array were set in attach(), in the
    // postmaster; the lock serialises every access; `f` runs no PostgreSQL
    // code that could raise an ERROR while the lock is held (plain copies).
    unsafe {
        pg_sys::LWLockAcquire(LOCK, mode);
        let r = f(std::slice::from_raw_parts_mut(SLOT_ARRAY, SLOTS));
        pg_sys::LWLockRelease(LOCK);
        r
    }
}

/// How long a claim (a background pass asked for, its worker not started
/// yet) holds, in microseconds.
const CLAIM_USECS: i64 = 60_000_000;

/// A claim is a slot with pid 0; it lapses after CLAIM_USECS, or when the
/// pass it announced takes its own slots.
fn lapsed(s: &Slot, now: i64) -> bool {
    s.pid == 0 && now - s.started_at > CLAIM_USECS
}

/// Announces a background pass over `table` before its worker runs: the
/// view shows it waiting, and the scheduler (scheduler.rs) leaves the
/// table alone.
pub fn claim(db: pg_sys::Oid, table: pg_sys::Oid) {
    // SAFETY: a plain call.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    with_slots(true, |slots| {
        if let Some(s) = slots.iter_mut().find(|s| s.state == 0 || lapsed(s, now)) {
            *s = Slot {
                state: State::Waiting as u32,
                pause: 0,
                pid: 0,
                db,
                table,
                rel: table,
                fork: 0,
                target_version: 0,
                blocks_done: 0,
                blocks_total: 0,
                started_at: now,
            };
        }
    });
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The slots of one pass; freed on drop (also when an ERROR unwinds).
pub struct Slots(Vec<usize>);

/// Takes a slot per relation of a pass over `table` in database `db`
/// (`rels`: relation and target key version).  Slots of a pass whose
/// process is gone (killed) are taken back first.  None if all are busy: the
/// pass then runs without progress reporting.
pub fn begin(db: pg_sys::Oid, table: pg_sys::Oid, rels: &[(pg_sys::Oid, u32)]) -> Slots {
    // SAFETY: plain reads of process globals.
    let (pid, now) = unsafe { (pg_sys::MyProcPid, pg_sys::GetCurrentTimestamp()) };
    let taken = with_slots(true, |slots| {
        for s in slots.iter_mut() {
            let claim_of_this = s.pid == 0 && s.db == db && s.table == table;
            if s.state != 0 && (claim_of_this || lapsed(s, now) || (s.pid != 0 && !alive(s.pid))) {
                s.state = 0;
            }
        }
        let mut taken = Vec::new();
        for &(rel, target_version) in rels {
            let Some(i) = slots.iter().position(|s| s.state == 0) else { break };
            slots[i] = Slot {
                state: State::Waiting as u32,
                pause: 0,
                pid,
                db,
                table,
                rel,
                fork: 0,
                target_version,
                blocks_done: 0,
                blocks_total: 0,
                started_at: now,
            };
            taken.push(i);
        }
        taken
    });
    Slots(taken)
}

impl Slots {
    /// The slot of the `n`th relation passed to `begin`, if it got one.
    pub fn slot(&self, n: usize) -> Option<usize> {
        self.0.get(n).copied()
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        with_slots(true, |slots| {
            for &i in &self.0 {
                slots[i].state = 0;
            }
        });
    }
}

/// Records where the pass over slot `i` is; returns whether it is paused.
pub fn report(i: Option<usize>, fork: i32, done: u64, total: u64) -> bool {
    let Some(i) = i else { return false };
    with_slots(true, |slots| {
        let s = &mut slots[i];
        s.fork = fork;
        s.blocks_done = done;
        s.blocks_total = total;
        s.state = if s.pause != 0 { State::Paused as u32 } else { State::Running as u32 };
        s.pause != 0
    })
}

/// Sets or clears the pause flag of every slot of passes over `table` in
/// `db`; returns how many slots it touched.
pub fn set_paused(db: pg_sys::Oid, table: pg_sys::Oid, pause: bool) -> usize {
    with_slots(true, |slots| {
        let mut n = 0;
        for s in slots.iter_mut().filter(|s| s.state != 0 && s.db == db && s.table == table) {
            s.pause = pause as u32;
            n += 1;
        }
        n
    })
}

/// Every running pass's slots.
pub fn list() -> Vec<Row> {
    // SAFETY: a plain call.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    with_slots(false, |slots| {
        slots
            .iter()
            .filter(|s| s.state != 0 && !lapsed(s, now))
            .map(|s| Row {
                db: s.db,
                table: s.table,
                rel: s.rel,
                fork: s.fork,
                target_version: s.target_version,
                blocks_done: s.blocks_done,
                blocks_total: s.blocks_total,
                state: match s.state {
                    2 => State::Running,
                    3 => State::Paused,
                    _ => State::Waiting,
                },
                started_at: s.started_at,
                pid: s.pid,
            })
            .collect()
    })
}
