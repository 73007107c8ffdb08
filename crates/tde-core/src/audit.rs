//! The audit trail: one record per key operation, chained so that nobody
//! can quietly edit, delete, reorder or truncate it.
//!
//! Why it is built this way (docs/audit.md has the auditor's view):
//!
//! - Each record's `chain` is HMAC-SHA256 over a fixed encoding of the
//!   record and the previous record's chain value.  The HMAC key (the audit
//!   key) is random, kept in the key store wrapped by the KEK, so only the
//!   master key opens it: someone with the files alone can neither forge a
//!   record nor re-chain the log after an edit.  Master-key rotation
//!   re-wraps the audit key, so the whole log stays verifiable.
//! - Records written before the cluster has a master key (a provider being
//!   added) cannot be keyed; they are chained with plain SHA-256 and marked
//!   `keyed: false`.  Such records may only open the log: once a keyed
//!   record appears, an unkeyed one after it is refused.
//! - The last record's sequence number and chain value (the *head*) are kept
//!   in the key store, which is itself authenticated.  So a log cut short,
//!   or swapped for an older copy, no longer reaches the head.
//!
//! The log file (`$PGDATA/tde/audit.log`) has one JSON object per line,
//! readable by log shippers and auditors; the HMAC covers the fields, not
//! the JSON text.  This module is pure: sealing, parsing and verifying are
//! tested here without a server, and the offline checker uses them too.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secret::{Error, WrapKey};
use crate::wrap::{unwrap_wrap_key, wrap_wrap_key, WRAPPED_WRAP_KEY_LEN};

pub const CHAIN_LEN: usize = 32;
/// The chain value "before" the first record.
pub const GENESIS: [u8; CHAIN_LEN] = [0u8; CHAIN_LEN];
const DOMAIN: &[u8] = b"tde audit record v1\0";

/// The HMAC key of the chain.  No `Debug`, no `Clone`, zeroized on drop.
pub struct AuditKey(Zeroizing<[u8; 32]>);

impl AuditKey {
    pub fn generate() -> Result<AuditKey, Error> {
        let k = WrapKey::generate()?;
        Ok(AuditKey(Zeroizing::new(*k.expose())))
    }

    /// Rebuilds a key kept in shared memory.
    pub fn from_bytes(bytes: &[u8; 32]) -> AuditKey {
        AuditKey(Zeroizing::new(*bytes))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// AES-GCM under the KEK; the associated data binds it to its store.
    pub fn wrap(&self, kek: &WrapKey, store_id: &str) -> Result<[u8; WRAPPED_WRAP_KEY_LEN], Error> {
        let k = WrapKey::from_bytes(&self.0[..])?;
        wrap_wrap_key(kek, &k, &aad(store_id))
    }

    pub fn unwrap(kek: &WrapKey, blob: &[u8], store_id: &str) -> Result<AuditKey, Error> {
        let k = unwrap_wrap_key(kek, blob, &aad(store_id))?;
        Ok(AuditKey(Zeroizing::new(*k.expose())))
    }
}

fn aad(store_id: &str) -> Vec<u8> {
    let mut a = b"tde audit key\0".to_vec();
    a.extend_from_slice(store_id.as_bytes());
    a
}

/// What was done.  The names are what `tde_audit_log.operation` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    ProviderAdded,
    MasterKeySet,
    MasterKeyRotated,
    KeyCreated,
    KeyRotated,
    KeyRetired,
    KeyDestroyed,
    KeyRemoved,
    ReencryptionStarted,
    ReencryptionPaused,
    ReencryptionResumed,
    ReencryptionFinished,
    UnwrapFailed,
    EnforcementRefused,
    PermissionDenied,
}

impl Op {
    pub fn as_str(&self) -> &'static str {
        match self {
            Op::ProviderAdded => "provider_added",
            Op::MasterKeySet => "master_key_set",
            Op::MasterKeyRotated => "master_key_rotated",
            Op::KeyCreated => "key_created",
            Op::KeyRotated => "key_rotated",
            Op::KeyRetired => "key_retired",
            Op::KeyDestroyed => "key_destroyed",
            Op::KeyRemoved => "key_removed",
            Op::ReencryptionStarted => "reencryption_started",
            Op::ReencryptionPaused => "reencryption_paused",
            Op::ReencryptionResumed => "reencryption_resumed",
            Op::ReencryptionFinished => "reencryption_finished",
            Op::UnwrapFailed => "unwrap_failed",
            Op::EnforcementRefused => "enforcement_refused",
            Op::PermissionDenied => "permission_denied",
        }
    }
}

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Refused,
    Denied,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
            Outcome::Denied => "denied",
        }
    }
}

/// One audit record.  Never holds key material: key ids and versions only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    /// Unix microseconds.
    pub time: i64,
    pub role: String,
    pub database: String,
    pub op: String,
    /// A relation, provider or master key name.
    pub object: String,
    /// The relation file, `spc/db/rel`, or empty.
    #[serde(default)]
    pub file: String,
    #[serde(default)]
    pub key_id: Option<u64>,
    #[serde(default)]
    pub key_version: Option<u32>,
    pub result: String,
    #[serde(default)]
    pub detail: String,
    /// Chained with the audit key (false only before the first master key).
    pub keyed: bool,
    /// Hex.
    pub chain: String,
}

impl Entry {
    /// A record not yet sealed (no sequence number or chain yet).
    pub fn new(time: i64, role: &str, database: &str, op: Op, object: &str, result: Outcome) -> Entry {
        Entry {
            seq: 0,
            time,
            role: role.to_string(),
            database: database.to_string(),
            op: op.as_str().to_string(),
            object: object.to_string(),
            file: String::new(),
            key_id: None,
            key_version: None,
            result: result.as_str().to_string(),
            detail: String::new(),
            keyed: false,
            chain: String::new(),
        }
    }

    /// The record as one line of the log file (JSON, newline-terminated).
    pub fn to_line(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        let mut s = serde_json::to_string(self).expect("audit entries serialise");
        s.push('\n');
        s
    }

    /// The record for the server log: `key=value` pairs after a fixed prefix.
    pub fn to_log(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_default();
        format!(
            "seq={} op={} result={} role={} database={} object={} file={} key_id={} key_version={} detail={}",
            self.seq,
            self.op,
            self.result,
            quote(&self.role),
            quote(&self.database),
            quote(&self.object),
            self.file,
            opt(self.key_id.map(|v| v.to_string())),
            opt(self.key_version.map(|v| v.to_string())),
            quote(&self.detail)
        )
    }

    pub fn chain_bytes(&self) -> Option<[u8; CHAIN_LEN]> {
        from_hex(&self.chain)
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<[u8; CHAIN_LEN]> {
    if s.len() != 2 * CHAIN_LEN {
        return None;
    }
    let mut out = [0u8; CHAIN_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The bytes the chain covers: every field but `chain`, each with its
/// length, so no two different records encode alike.
fn encode(e: &Entry) -> Vec<u8> {
    let mut out = DOMAIN.to_vec();
    let mut field = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    field(&e.seq.to_le_bytes());
    field(&e.time.to_le_bytes());
    field(e.role.as_bytes());
    field(e.database.as_bytes());
    field(e.op.as_bytes());
    field(e.object.as_bytes());
    field(e.file.as_bytes());
    match e.key_id {
        Some(v) => field(&v.to_le_bytes()),
        None => field(&[]),
    }
    match e.key_version {
        Some(v) => field(&v.to_le_bytes()),
        None => field(&[]),
    }
    field(e.result.as_bytes());
    field(e.detail.as_bytes());
    field(&[e.keyed as u8]);
    out
}

/// The chain value of `e` after `prev`: HMAC-SHA256 under the audit key if
/// `e.keyed`, else SHA-256.
pub fn chain_of(prev: &[u8; CHAIN_LEN], e: &Entry, key: Option<&AuditKey>) -> Option<[u8; CHAIN_LEN]> {
    let body = encode(e);
    if e.keyed {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key?.expose()).expect("HMAC accepts any key length");
        m.update(prev);
        m.update(&body);
        Some(m.finalize().into_bytes().into())
    } else {
        let mut h = Sha256::new();
        h.update(prev);
        h.update(&body);
        Some(h.finalize().into())
    }
}

/// The last record's sequence number and chain value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub chain: [u8; CHAIN_LEN],
}

impl Head {
    pub const EMPTY: Head = Head { seq: 0, chain: GENESIS };
}

/// Gives `e` the next sequence number after `head` and its chain value:
/// keyed if `key` is given.  Returns the new head.
pub fn seal(e: &mut Entry, head: &Head, key: Option<&AuditKey>) -> Head {
    e.seq = head.seq + 1;
    e.keyed = key.is_some();
    let chain = chain_of(&head.chain, e, key).expect("a keyed record is sealed with its key");
    e.chain = to_hex(&chain);
    Head { seq: e.seq, chain }
}

/// The complete lines of a log file, and how many bytes of a torn last line
/// (a crash while appending) follow them.
pub fn split_lines(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let end = bytes.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
    let lines = bytes[..end].split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    (lines, bytes.len() - end)
}

/// The sequence number of the last complete record of a log file (0 if it
/// has none), for appending after it.
pub fn last_seq(bytes: &[u8]) -> Result<u64, String> {
    let (lines, _) = split_lines(bytes);
    match lines.last() {
        None => Ok(0),
        Some(l) => serde_json::from_slice::<Entry>(l).map(|e| e.seq).map_err(|e| format!("last record: {e}")),
    }
}

/// The end of a log file without reading all of it: the sequence number of
/// its last complete record, and the length of the file up to the end of
/// that record (a torn last line, left by a crash, lies beyond it).  None
/// if there is no file.
pub fn read_end(path: &std::path::Path) -> std::io::Result<Option<(u64, u64)>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut chunk = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(chunk);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        f.by_ref().take(len - start).read_to_end(&mut buf)?;
        let (lines, torn) = split_lines(&buf);
        // A complete last line needs the newline before it in the chunk too
        // (or the chunk to start the file).
        let whole = start == 0 || lines.len() >= 2;
        if whole {
            let seq = last_seq(&buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            return Ok(Some((seq, len - torn as u64)));
        }
        chunk *= 4;
    }
}

/// What a verification found.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// Complete records in the file.
    pub records: u64,
    /// Records after the head the key store vouches for (a crash before the
    /// key store caught up; recovery replays them from the WAL).
    pub beyond_head: u64,
    /// Empty if the log is intact.
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies a whole log file against the head the key store holds.
///
/// `key` is the audit key (None if the store has none yet; keyed records
/// are then unverifiable, a problem).  With `exact_head`, the log must end
/// at the head (a running server, whose head is current); otherwise it may
/// run past it with valid records (a stopped cluster after a crash).
pub fn verify(bytes: &[u8], key: Option<&AuditKey>, head: &Head, exact_head: bool) -> Report {
    let (lines, torn) = split_lines(bytes);
    let mut problems = Vec::new();
    let mut prev = Head::EMPTY;
    let mut keyed_seen = false;
    let mut head_seen = head.seq == 0;
    let mut records = 0u64;
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let e: Entry = match serde_json::from_slice(line) {
            Ok(e) => e,
            Err(err) => {
                problems.push(format!("line {n} is not an audit record: {err}"));
                break;
            }
        };
        records += 1;
        if e.seq != prev.seq + 1 {
            problems.push(format!(
                "line {n}: record {} follows record {} (records deleted, inserted or reordered)",
                e.seq, prev.seq
            ));
            break;
        }
        if keyed_seen && !e.keyed {
            problems.push(format!("record {}: unkeyed record after keyed ones", e.seq));
            break;
        }
        keyed_seen |= e.keyed;
        if e.keyed && key.is_none() {
            problems.push(format!("record {}: keyed, but the audit key is not available", e.seq));
            break;
        }
        let want = chain_of(&prev.chain, &e, key);
        if want.is_none() || e.chain_bytes() != want {
            problems.push(format!(
                "record {}: chain value does not match (the record or one before it was altered)",
                e.seq
            ));
            break;
        }
        prev = Head { seq: e.seq, chain: want.unwrap_or(GENESIS) };
        if prev.seq == head.seq {
            if prev.chain != head.chain {
                problems.push(format!("record {}: not the record the key store holds as the head", e.seq));
                break;
            }
            head_seen = true;
        }
    }
    if problems.is_empty() {
        if torn > 0 {
            problems.push(format!("the log ends with {torn} bytes of an incomplete record"));
        } else if prev.seq < head.seq {
            problems.push(format!(
                "the log ends at record {}, but the key store's head is record {} (the log was truncated)",
                prev.seq, head.seq
            ));
        } else if !head_seen {
            problems.push(format!("the key store's head, record {}, is not in the log", head.seq));
        } else if exact_head && prev.seq > head.seq {
            problems
                .push(format!("the log runs past the key store's head, record {}, to record {}", head.seq, prev.seq));
        }
    }
    Report { records, beyond_head: prev.seq.saturating_sub(head.seq), problems }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuditKey {
        AuditKey::from_bytes(&[9u8; 32])
    }

    fn entry(op: Op, object: &str) -> Entry {
        let mut e = Entry::new(1_700_000_000_000_000, "alice", "postgres", op, object, Outcome::Ok);
        e.file = "1663/5/16384".into();
        e.key_id = Some(3);
        e.key_version = Some(2);
        e
    }

    /// A log of `n` records: the first unkeyed (before a master key), the
    /// rest keyed.  Returns the file bytes, its lines and the head.
    fn log(n: usize) -> (Vec<u8>, Vec<String>, Head) {
        let k = key();
        let mut head = Head::EMPTY;
        let mut lines = Vec::new();
        for i in 0..n {
            let mut e = entry(if i == 0 { Op::ProviderAdded } else { Op::KeyCreated }, &format!("t{i}"));
            head = seal(&mut e, &head, if i == 0 { None } else { Some(&k) });
            lines.push(e.to_line());
        }
        (lines.concat().into_bytes(), lines, head)
    }

    #[test]
    fn chain_is_hmac_sha256_over_prev_and_fields() {
        // The HMAC itself is the RFC 4231 one, tested in storefile; here the
        // construction: HMAC(key, prev || encode(entry)).
        let mut e = entry(Op::KeyRotated, "public.t");
        let h = seal(&mut e, &Head::EMPTY, Some(&key()));
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&[9u8; 32]).unwrap();
        m.update(&GENESIS);
        m.update(&encode(&e));
        assert_eq!(h.chain, <[u8; 32]>::from(m.finalize().into_bytes()));
        assert_eq!(e.seq, 1);
        assert!(e.keyed);
        assert_eq!(from_hex(&e.chain), Some(h.chain));
    }

    #[test]
    fn intact_log_verifies() {
        let (bytes, _, head) = log(5);
        let r = verify(&bytes, Some(&key()), &head, true);
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.records, 5);
        assert!(verify(b"", Some(&key()), &Head::EMPTY, true).ok());
        assert_eq!(last_seq(&bytes).unwrap(), 5);
    }

    #[test]
    fn every_field_edit_is_detected() {
        let (_, lines, head) = log(4);
        type Edit = Box<dyn Fn(&mut Entry)>;
        let edits: Vec<Edit> = vec![
            Box::new(|e| e.time += 1),
            Box::new(|e| e.role = "mallory".into()),
            Box::new(|e| e.database.push('x')),
            Box::new(|e| e.op = "key_retired".into()),
            Box::new(|e| e.object = "t9".into()),
            Box::new(|e| e.file.clear()),
            Box::new(|e| e.key_id = None),
            Box::new(|e| e.key_version = Some(1)),
            Box::new(|e| e.result = "failed".into()),
            Box::new(|e| e.detail = "x".into()),
            Box::new(|e| e.keyed = false),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut l = lines.clone();
            let mut e: Entry = serde_json::from_str(&l[2]).unwrap();
            edit(&mut e);
            l[2] = e.to_line();
            let r = verify(l.concat().as_bytes(), Some(&key()), &head, true);
            assert!(!r.ok(), "edit {i} not detected");
        }
    }

    #[test]
    fn deletion_swap_truncation_and_rechaining_are_detected() {
        let (_, lines, head) = log(5);
        let k = key();
        let check = |l: &[String]| verify(l.concat().as_bytes(), Some(&k), &head, true);
        let mut deleted = lines.clone();
        deleted.remove(2);
        assert!(!check(&deleted).ok());
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert!(!check(&swapped).ok());
        for cut in 0..lines.len() {
            assert!(!check(&lines[..cut]).ok(), "truncation to {cut} not detected");
        }
        // Renumbered after a deletion, re-chained without the key: an
        // attacker can only produce unkeyed records, which may not follow
        // keyed ones, and the head no longer matches.
        let mut forged = Vec::new();
        let mut h = Head::EMPTY;
        let attacker = AuditKey::from_bytes(&[1u8; 32]);
        for (i, l) in lines.iter().enumerate().filter(|(i, _)| *i != 2) {
            let mut e: Entry = serde_json::from_str(l).unwrap();
            h = seal(&mut e, &h, if i == 0 { None } else { Some(&attacker) });
            forged.push(e.to_line());
        }
        assert!(!check(&forged).ok());
        // A torn last line, an extra field, garbage.
        let mut torn = lines.concat();
        torn.push_str("{\"seq\":6");
        assert!(!verify(torn.as_bytes(), Some(&k), &head, true).ok());
        let mut extra = lines.clone();
        extra[4] = extra[4].replacen('{', "{\"note\":1,", 1);
        assert!(!check(&extra).ok());
        let mut junk = lines.clone();
        junk[3] = "hello\n".into();
        assert!(!check(&junk).ok());
    }

    #[test]
    fn head_rules() {
        let (bytes, lines, head) = log(5);
        let k = key();
        // A stopped cluster after a crash: the key store's head is behind.
        let (_, _, older) = log(3);
        let r = verify(&bytes, Some(&k), &older, false);
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.beyond_head, 2);
        assert!(!verify(&bytes, Some(&k), &older, true).ok());
        // A head that is not in the log at all (another log swapped in).
        let wrong = Head { seq: 3, chain: [1u8; 32] };
        assert!(!verify(&bytes, Some(&k), &wrong, false).ok());
        // Keyed records without the key cannot be verified.
        assert!(!verify(&bytes, None, &head, true).ok());
        // An unkeyed prefix verifies without a key.
        let r = verify(lines[0].as_bytes(), None, &log(1).2, true);
        assert!(r.ok(), "{:?}", r.problems);
    }

    #[test]
    fn read_end_finds_the_last_record_without_reading_everything() {
        let dir = std::env::temp_dir().join(format!("tde-audit-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("audit.log");
        assert_eq!(read_end(&p).unwrap(), None);
        let (bytes, _, _) = log(2000); // well over one 64 kB chunk
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(read_end(&p).unwrap(), Some((2000, bytes.len() as u64)));
        let mut torn = bytes.clone();
        torn.extend_from_slice(b"{\"seq\":2001,\"ti");
        std::fs::write(&p, &torn).unwrap();
        assert_eq!(read_end(&p).unwrap(), Some((2000, bytes.len() as u64)));
        std::fs::write(&p, b"").unwrap();
        assert_eq!(read_end(&p).unwrap(), Some((0, 0)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn audit_key_wraps_under_its_store() {
        let kek = WrapKey::from_bytes(&[7u8; 32]).unwrap();
        let blob = key().wrap(&kek, "store-a").unwrap();
        assert_eq!(AuditKey::unwrap(&kek, &blob, "store-a").unwrap().expose(), &[9u8; 32]);
        assert!(AuditKey::unwrap(&kek, &blob, "store-b").is_err());
        let other = WrapKey::from_bytes(&[8u8; 32]).unwrap();
        assert!(AuditKey::unwrap(&other, &blob, "store-a").is_err());
    }

    #[test]
    fn log_line_has_no_newline_inside_and_quotes() {
        let mut e = entry(Op::PermissionDenied, "tde_rotate_key(\"x\")\nnext");
        e.detail = "a\"b".into();
        let line = e.to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(e.to_log().contains("object=\"tde_rotate_key(\\\"x\\\")\\nnext\""));
        let (lines, torn) = split_lines(line.as_bytes());
        assert_eq!((lines.len(), torn), (1, 0));
    }
}
