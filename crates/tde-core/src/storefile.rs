//! The key store file: an authenticated, append-only log of frames.
//!
//! Why it is built this way:
//!
//! - **Cost per change is constant.**  A change (a new table key, a removed
//!   one) appends one frame of a few hundred bytes; the file is rewritten
//!   whole only when it is compacted (at a checkpoint), which folds the log
//!   into a new snapshot.  Creating the ten-thousandth encrypted table costs
//!   what creating the first did.
//! - **Authenticated under the key hierarchy.**  Every frame carries an
//!   HMAC-SHA256 tag under a key derived from the cluster's key-encryption
//!   key (KEK), which only the master key unwraps.  Anyone who can write the
//!   file but has no master key cannot delete, edit, reorder or invent a
//!   frame: the tags chain (each covers the previous frame's tag), so a
//!   frame removed from the middle breaks the chain too.
//! - **Crash-safe without an fsync per change.**  A change is WAL-logged
//!   before it is appended, so a tail lost in a crash is replayed from the
//!   WAL; the server fsyncs the file at each checkpoint (keys/store.rs).  A
//!   *torn* tail -- a last frame cut short, or zero bytes where a frame
//!   should start -- is therefore expected after a crash and is dropped; a
//!   complete frame with a wrong tag is never expected and is refused.
//!
//! Layout (integers little-endian):
//!
//! ```text
//!  header, 16 bytes:   magic "PGTDEKS\0" | version u32 = 2 | flags u32 = 0
//!  frame, repeated:    body_len u32 | kind u8 | generation u64 | body | tag [32]
//!  kind:   1 = snapshot (body: the whole store as JSON), first frame only
//!          2 = change   (body: one Change as JSON)
//!          | 0x80 if the tag is keyed (see below)
//!  tag  =  HMAC-SHA256(K, previous tag | kind | generation | body_len | body)
//!          previous tag of the first frame = SHA-256 of the header
//! ```
//!
//! `K` is the *authentication key*: HKDF-SHA256 of the KEK, salted with the
//! store id ([`AuthKey::derive`]).  Before the first master key is set there
//! is no KEK; frames written then are *unkeyed* (`K` is a public constant, so
//! the tag is only a checksum).  The rules that make this safe:
//!
//! - an unkeyed frame may not follow a keyed one;
//! - the state after an unkeyed frame may hold no master key and no table
//!   key, so an unkeyed frame can only describe providers.
//!
//! A store whose keyed part was stripped is therefore a store with no keys
//! and no master key -- indistinguishable from a new one, which is why
//! encrypted pages carry their own mark on disk (page.rs) and why recovery
//! checks generations against the WAL (keystore.rs, [`crate::keystore::redo_step`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::keystore::{Change, KeyStore, StoreError};
use crate::secret::WrapKey;

pub const MAGIC: &[u8; 8] = b"PGTDEKS\0";
pub const FORMAT_VERSION: u32 = 2;
pub const HEADER_LEN: usize = 16;
const FRAME_HEAD: usize = 4 + 1 + 8;
pub const TAG_LEN: usize = 32;
/// Bytes a frame adds to its body.
pub const FRAME_OVERHEAD: usize = FRAME_HEAD + TAG_LEN;
/// No body is anywhere near this; a larger length is corruption.
const MAX_BODY: u32 = 1 << 30;

const KIND_SNAPSHOT: u8 = 1;
const KIND_CHANGE: u8 = 2;
const KEYED: u8 = 0x80;

/// The key that authenticates frames.  Derived from the KEK; no `Debug`,
/// no `Clone`, zeroized on drop.
pub struct AuthKey(Zeroizing<[u8; 32]>);

impl AuthKey {
    /// HKDF-SHA256 (RFC 5869): IKM = the KEK, salt = the store id, info
    /// names the purpose, so this key is independent of every wrapping key.
    pub fn derive(kek: &WrapKey, store_id: &str) -> AuthKey {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(store_id.as_bytes()), kek.expose());
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit.
        hk.expand(b"tde key store authentication v1", &mut out[..]).expect("32 bytes is a valid HKDF length");
        AuthKey(out)
    }

    /// Rebuilds a key kept in shared memory.
    pub fn from_bytes(bytes: &[u8; 32]) -> AuthKey {
        AuthKey(Zeroizing::new(*bytes))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The public key of unkeyed frames (a checksum, not authentication).
fn unkeyed_key() -> [u8; 32] {
    Sha256::digest(b"tde key store: unauthenticated frame").into()
}

fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

fn first_prev_tag() -> [u8; TAG_LEN] {
    Sha256::digest(header()).into()
}

fn compute_tag(key: &[u8; 32], prev: &[u8; TAG_LEN], kind: u8, generation: u64, body: &[u8]) -> [u8; TAG_LEN] {
    // HMAC takes keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(prev);
    m.update(&[kind]);
    m.update(&generation.to_le_bytes());
    m.update(&(body.len() as u32).to_le_bytes());
    m.update(body);
    m.finalize().into_bytes().into()
}

/// Encodes one frame after the frame whose tag is `prev`; returns its bytes
/// and its tag.  `auth` None writes an unkeyed frame.
fn encode_frame(
    prev: &[u8; TAG_LEN],
    kind: u8,
    generation: u64,
    body: &[u8],
    auth: Option<&AuthKey>,
) -> (Vec<u8>, [u8; TAG_LEN]) {
    let (kind, tag) = match auth {
        Some(k) => (kind | KEYED, compute_tag(k.expose(), prev, kind | KEYED, generation, body)),
        None => (kind, compute_tag(&unkeyed_key(), prev, kind, generation, body)),
    };
    let mut out = Vec::with_capacity(FRAME_OVERHEAD + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&tag);
    (out, tag)
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Plain data with string keys: serialising cannot fail.
    serde_json::to_vec(v).expect("key store data serialises")
}

/// A whole new file holding `ks` as its snapshot; returns the bytes and the
/// tag to append after.  Keyed if `auth` is given; a store with a master key
/// or table keys must be keyed.
pub fn encode_snapshot(ks: &KeyStore, auth: Option<&AuthKey>) -> (Vec<u8>, [u8; TAG_LEN]) {
    debug_assert!(auth.is_some() || (ks.principal.is_none() && ks.keys.is_empty()));
    let (frame, tag) = encode_frame(&first_prev_tag(), KIND_SNAPSHOT, ks.generation, &json(ks), auth);
    let mut out = header().to_vec();
    out.extend_from_slice(&frame);
    (out, tag)
}

/// One change frame to append after the frame whose tag is `prev`.
pub fn encode_change(
    prev: &[u8; TAG_LEN],
    generation: u64,
    change: &Change,
    auth: Option<&AuthKey>,
) -> (Vec<u8>, [u8; TAG_LEN]) {
    encode_frame(prev, KIND_CHANGE, generation, &json(change), auth)
}

/// Re-chains change frames: `tail` (complete frames that followed the frame
/// whose tag is `prev`) is checked against `prev` and `auth` and encoded
/// again after the frame whose tag is `new_prev`, unchanged otherwise.
/// Compaction uses it for frames appended while it wrote the new snapshot.
/// Returns the new bytes and the new last tag.
pub fn rechain(
    tail: &[u8],
    prev: &[u8; TAG_LEN],
    new_prev: &[u8; TAG_LEN],
    auth: Option<&AuthKey>,
) -> Result<(Vec<u8>, [u8; TAG_LEN]), String> {
    let key = match auth {
        Some(a) => *a.expose(),
        None => unkeyed_key(),
    };
    let (mut prev, mut new_prev) = (*prev, *new_prev);
    let mut out = Vec::with_capacity(tail.len());
    let mut pos = 0usize;
    while pos < tail.len() {
        let rest = &tail[pos..];
        if rest.len() < FRAME_OVERHEAD {
            return Err(format!("a partial frame at byte {pos}"));
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let total = FRAME_OVERHEAD + len;
        if len > MAX_BODY as usize || rest.len() < total {
            return Err(format!("a partial frame at byte {pos}"));
        }
        let kind = rest[4];
        let mut g = [0u8; 8];
        g.copy_from_slice(&rest[5..13]);
        let generation = u64::from_le_bytes(g);
        let body = &rest[FRAME_HEAD..FRAME_HEAD + len];
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&rest[FRAME_HEAD + len..total]);
        if kind & !KEYED != KIND_CHANGE || (kind & KEYED != 0) != auth.is_some() {
            return Err(format!("an unexpected frame kind {kind} at byte {pos}"));
        }
        if !constant_time_eq(&compute_tag(&key, &prev, kind, generation, body), &tag) {
            return Err(format!("the frame at byte {pos} does not follow the chain"));
        }
        let (f, t) = encode_frame(&new_prev, KIND_CHANGE, generation, body, auth);
        out.extend_from_slice(&f);
        prev = tag;
        new_prev = t;
        pos += total;
    }
    Ok((out, new_prev))
}

/// What reading a file found.
pub struct Loaded {
    /// The store after every frame (not yet authenticated if
    /// `needs_auth`: call [`Loaded::authenticate`]).
    pub state: KeyStore,
    /// Tag of the last good frame: the next frame chains to it.
    pub last_tag: [u8; TAG_LEN],
    /// Bytes of good frames; anything after it is a torn tail.
    pub valid_len: u64,
    /// Length of the torn tail that was ignored (0 normally).
    pub torn_bytes: u64,
    /// Length of header plus snapshot frame.
    pub snapshot_len: u64,
    /// Number of change frames after the snapshot.
    pub changes: u64,
    keyed: Vec<KeyedFrame>,
}

struct KeyedFrame {
    prev: [u8; TAG_LEN],
    kind: u8,
    generation: u64,
    body: Vec<u8>,
    tag: [u8; TAG_LEN],
}

impl Loaded {
    /// Whether some frames are keyed, so [`Loaded::authenticate`] must run
    /// before the state is trusted.
    pub fn needs_auth(&self) -> bool {
        !self.keyed.is_empty()
    }

    /// Checks every keyed frame's tag with `auth` (constant time).
    pub fn authenticate(&self, auth: &AuthKey, path: &Path) -> Result<(), StoreError> {
        for (i, f) in self.keyed.iter().enumerate() {
            let want = compute_tag(auth.expose(), &f.prev, f.kind, f.generation, &f.body);
            if !constant_time_eq(&want, &f.tag) {
                return Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    why: format!(
                        "authentication failed at keyed frame {} (generation {}): the file was edited, or does not belong to this master key",
                        i + 1,
                        f.generation
                    ),
                });
            }
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses a file: header, frames, replay rules; unkeyed tags are checked
/// here, keyed ones by [`Loaded::authenticate`].  `path` names the file in
/// errors.  A torn tail is dropped (reported in `torn_bytes`).
pub fn parse(bytes: &[u8], path: &Path) -> Result<Loaded, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt { path: path.to_path_buf(), why };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt("file is shorter than its header (truncated)".into()));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt("bad magic number: not a tde key store".into()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(corrupt(format!("unsupported format version {version}")));
    }
    if bytes[12..16] != [0; 4] {
        return Err(corrupt("unknown header flags".into()));
    }
    let unkeyed = unkeyed_key();
    let mut prev = first_prev_tag();
    let mut pos = HEADER_LEN;
    let mut state: Option<KeyStore> = None;
    let mut keyed: Vec<KeyedFrame> = Vec::new();
    let mut snapshot_len = 0u64;
    let mut changes = 0u64;
    let mut torn_bytes = 0u64;
    let mut n = 0usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        // A tail that is cut short, or zeros where a frame should start
        // (a crash while appending), is torn: the WAL still has it.
        let torn = |rest: &[u8]| rest.len() < FRAME_OVERHEAD || rest.iter().all(|&b| b == 0);
        if torn(rest) {
            torn_bytes = rest.len() as u64;
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if len > MAX_BODY {
            return Err(corrupt(format!("frame {} at byte {pos} has an impossible length {len}", n + 1)));
        }
        let total = FRAME_OVERHEAD + len as usize;
        if rest.len() < total {
            torn_bytes = rest.len() as u64;
            break;
        }
        n += 1;
        let kind = rest[4];
        let mut g = [0u8; 8];
        g.copy_from_slice(&rest[5..13]);
        let generation = u64::from_le_bytes(g);
        let body = &rest[FRAME_HEAD..FRAME_HEAD + len as usize];
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&rest[FRAME_HEAD + len as usize..total]);
        let is_keyed = kind & KEYED != 0;
        let base = kind & !KEYED;
        if is_keyed {
            keyed.push(KeyedFrame { prev, kind, generation, body: body.to_vec(), tag });
        } else {
            if !keyed.is_empty() {
                return Err(corrupt(format!("frame {n} is unauthenticated but follows authenticated frames")));
            }
            if !constant_time_eq(&compute_tag(&unkeyed, &prev, kind, generation, body), &tag) {
                return Err(corrupt(format!("checksum mismatch in frame {n} (generation {generation})")));
            }
        }
        match (base, &mut state) {
            (KIND_SNAPSHOT, None) => {
                let ks: KeyStore = serde_json::from_slice(body)
                    .map_err(|e| corrupt(format!("malformed snapshot in frame {n}: {e}")))?;
                if ks.generation != generation {
                    return Err(corrupt(format!("snapshot says generation {}, its frame {generation}", ks.generation)));
                }
                state = Some(ks);
                snapshot_len = (pos + total) as u64;
            }
            (KIND_CHANGE, Some(ks)) => {
                let change: Change =
                    serde_json::from_slice(body).map_err(|e| corrupt(format!("malformed change in frame {n}: {e}")))?;
                let local_removal = matches!(change, Change::RemoveKey { .. }) && generation == ks.generation;
                if generation != ks.generation + 1 && !local_removal {
                    return Err(corrupt(format!(
                        "frame {n} has generation {generation} after generation {}: frames are missing or out of order",
                        ks.generation
                    )));
                }
                if matches!(change, Change::Init { .. } | Change::Checkpoint { .. }) {
                    return Err(corrupt(format!("frame {n} holds a change that is never stored")));
                }
                ks.apply(&change)?;
                ks.generation = generation;
                changes += 1;
            }
            (KIND_SNAPSHOT, Some(_)) => return Err(corrupt(format!("frame {n} is a second snapshot"))),
            (KIND_CHANGE, None) => return Err(corrupt("the first frame is not a snapshot".into())),
            _ => return Err(corrupt(format!("frame {n} has unknown kind {kind}"))),
        }
        if !is_keyed {
            let ks = state.as_ref().expect("set above");
            if ks.principal.is_some() || !ks.keys.is_empty() {
                return Err(corrupt(format!("frame {n} is unauthenticated but sets a master key or table keys")));
            }
        }
        prev = tag;
        pos += total;
    }
    let state = state.ok_or_else(|| corrupt("the file has no snapshot (truncated)".into()))?;
    Ok(Loaded { state, last_tag: prev, valid_len: pos as u64, torn_bytes, snapshot_len, changes, keyed })
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_path_buf(), source }
}

/// Reads the file at `path`; `Ok(None)` if it does not exist.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// Appends frames to the file.  No fsync: the change is in the WAL, and
/// the server fsyncs the file at each checkpoint ([`sync`]).  The file must
/// not be a symlink.
pub fn append(path: &Path, frames: &[u8]) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .append(true)
        .custom_flags(libc_flags::O_NOFOLLOW)
        .open(path)
        .map_err(io("open for appending", path))?;
    f.write_all(frames).map_err(io("append to", path))
}

/// [`append`], creating the file (mode 0600, never through a symlink) if
/// it does not exist yet; a new file's directory entry is fsynced.
pub fn append_or_create(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    match append(path, bytes) {
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            create_private(path)?.write_all(bytes).map_err(io("append to", path))?;
            sync_dir(path)
        }
        other => other,
    }
}

/// Creates a new file, mode 0600: exclusively (O_EXCL), never through a
/// symlink.
fn create_private(path: &Path) -> Result<File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc_flags::O_NOFOLLOW)
        .open(path)
        .map_err(io("create", path))
}

/// Makes a new or renamed directory entry of `path` durable.
fn sync_dir(path: &Path) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory of", path))
}

/// Bytes `from..to` of the file at `path`.
pub fn read_range(path: &Path, from: u64, to: u64) -> Result<Vec<u8>, StoreError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).map_err(io("open", path))?;
    f.seek(SeekFrom::Start(from)).map_err(io("seek in", path))?;
    let mut buf = vec![0u8; to.saturating_sub(from) as usize];
    f.read_exact(&mut buf).map_err(io("read", path))?;
    Ok(buf)
}

/// Cuts a torn tail off before anything is appended after it.
pub fn truncate(path: &Path, len: u64) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new().write(true).custom_flags(libc_flags::O_NOFOLLOW).open(path).map_err(io("open", path))?;
    f.set_len(len).map_err(io("truncate", path))?;
    f.sync_all().map_err(io("fsync", path))
}

/// Makes appended frames durable (at a checkpoint).
pub fn sync(path: &Path) -> Result<(), StoreError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io("fsync", path))
}

/// Replaces the file whole (a new store, or compaction): temporary file
/// created exclusively (never through a planted file or symlink), fsync,
/// rename, fsync the directory.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = temp_path(path, "tmp");
    write_new(&tmp, bytes)?;
    finish_replace(&tmp, path, &[])
}

/// `path` with `.suffix` added: the temporary files of [`replace`] and of a
/// compaction.
pub fn temp_path(path: &Path, suffix: &str) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".");
    tmp.push(suffix);
    PathBuf::from(tmp)
}

/// Writes a new temporary file and fsyncs it.  One left by a crash is ours
/// to remove (the directory is the server's, mode 0700); anything else
/// there is refused by O_EXCL.
pub fn write_new(tmp: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    match std::fs::symlink_metadata(tmp) {
        Ok(m) if m.file_type().is_file() => std::fs::remove_file(tmp).map_err(io("remove stale", tmp))?,
        _ => {}
    }
    let mut f = create_private(tmp)?;
    f.write_all(bytes).map_err(io("write", tmp))?;
    f.sync_all().map_err(io("fsync", tmp))
}

/// Appends `tail` to the temporary file `tmp` (written by [`write_new`]),
/// fsyncs it, and renames it over `path`, fsyncing the directory.
pub fn finish_replace(tmp: &Path, path: &Path, tail: &[u8]) -> Result<(), StoreError> {
    if !tail.is_empty() {
        append(tmp, tail)?;
        sync(tmp)?;
    }
    std::fs::rename(tmp, path).map_err(io("rename", path))?;
    sync_dir(path)
}

mod libc_flags {
    /// O_NOFOLLOW on Linux (all architectures PostgreSQL runs on here).
    pub const O_NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::{FileId, KeyEntry, Phase, Principal, ProviderEntry, ALGORITHM_XTS};

    #[test]
    fn rechained_frames_follow_a_new_snapshot() {
        let auth = AuthKey::derive(&kek(), "store");
        let mut ks = KeyStore::new("store".into());
        ks.generation = 1;
        let (old, old_tag) = encode_snapshot(&ks, Some(&auth));
        // Two changes after the old snapshot.
        let c1 = Change::RemoveKey { file: FileId { spc: 1, db: 2, rel: 3 } };
        let c2 = Change::RemoveKey { file: FileId { spc: 1, db: 2, rel: 4 } };
        let (f1, t1) = encode_change(&old_tag, 2, &c1, Some(&auth));
        let (f2, _) = encode_change(&t1, 3, &c2, Some(&auth));
        let tail = [f1, f2].concat();
        // A new snapshot (another store id, so another tag), then the tail.
        let mut ks2 = ks.clone();
        ks2.store_id = "store".into();
        ks2.next_key_id = 7;
        let (new, new_tag) = encode_snapshot(&ks2, Some(&auth));
        assert_ne!(new_tag, old_tag);
        let (re, _) = rechain(&tail, &old_tag, &new_tag, Some(&auth)).unwrap();
        let file = [new, re].concat();
        let l = parse(&file, Path::new("x")).unwrap();
        l.authenticate(&auth, Path::new("x")).unwrap();
        assert_eq!((l.state.generation, l.changes, l.state.next_key_id), (3, 2, 7));
        // Not the chain it claims to follow: refused.
        assert!(rechain(&tail, &new_tag, &old_tag, Some(&auth)).is_err());
        assert!(rechain(&tail[..tail.len() - 1], &old_tag, &new_tag, Some(&auth)).is_err());
        let other = AuthKey::derive(&WrapKey::from_bytes(&[8u8; 32]).unwrap(), "store");
        assert!(rechain(&tail, &old_tag, &new_tag, Some(&other)).is_err());
        let _ = old;
    }

    fn kek() -> WrapKey {
        WrapKey::from_bytes(&[7u8; 32]).unwrap()
    }

    fn entry(rel: u32) -> KeyEntry {
        KeyEntry {
            file: FileId { spc: 1663, db: 5, rel },
            key_id: u64::from(rel),
            version: 1,
            created: 1,
            algorithm: ALGORITHM_XTS.into(),
            wrapped: "AAAA".into(),
            previous: None,
            retired: Vec::new(),
            phase: Phase::Encrypted,
        }
    }

    /// A file as the server writes it: unkeyed snapshot with a provider,
    /// then keyed frames: the master key, three keys, one local removal.
    fn sample() -> (Vec<u8>, AuthKey) {
        let auth = AuthKey::derive(&kek(), "store-1");
        let mut ks = KeyStore::new("store-1".into());
        ks.generation = 1;
        ks.apply(&Change::AddProvider(ProviderEntry {
            name: "local".into(),
            kind: "file".into(),
            options: serde_json::json!({"path": "/k"}),
        }))
        .unwrap();
        let (mut bytes, mut tag) = encode_snapshot(&ks, None);
        let mut gen = 1;
        let principal = Principal { provider: "local".into(), key_name: "mek".into(), wrapped_kek: "BBBB".into() };
        let mut changes = vec![Change::SetPrincipal(principal)];
        changes.extend((10..13).map(|r| Change::AddKey(entry(r))));
        for c in changes {
            gen += 1;
            let (f, t) = encode_change(&tag, gen, &c, Some(&auth));
            bytes.extend_from_slice(&f);
            tag = t;
        }
        let (f, _) = encode_change(&tag, gen, &Change::RemoveKey { file: entry(11).file }, Some(&auth));
        bytes.extend_from_slice(&f);
        (bytes, auth)
    }

    fn p() -> &'static Path {
        Path::new("/data/tde/keystore")
    }

    #[test]
    fn round_trip_and_authenticate() {
        let (bytes, auth) = sample();
        let l = parse(&bytes, p()).unwrap();
        assert!(l.needs_auth());
        l.authenticate(&auth, p()).unwrap();
        assert_eq!(l.state.generation, 5);
        let rels: Vec<u32> = l.state.keys.values().map(|k| k.file.rel).collect();
        assert_eq!(rels, vec![10, 12]);
        assert_eq!(l.valid_len, bytes.len() as u64);
        assert_eq!((l.torn_bytes, l.changes), (0, 5));
    }

    #[test]
    fn another_kek_does_not_authenticate() {
        let (bytes, _) = sample();
        let other = AuthKey::derive(&WrapKey::from_bytes(&[8u8; 32]).unwrap(), "store-1");
        let err = parse(&bytes, p()).unwrap().authenticate(&other, p()).unwrap_err().to_string();
        assert!(err.contains("authentication failed") && err.contains("/data/tde/keystore"), "{err}");
        // Same KEK, another store id: another key too.
        let other = AuthKey::derive(&kek(), "store-2");
        assert!(parse(&bytes, p()).unwrap().authenticate(&other, p()).is_err());
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let (bytes, auth) = sample();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let ok = parse(&b, p()).and_then(|l| l.authenticate(&auth, p()).map(|_| l));
            match ok {
                Err(_) => {}
                // A flip in a length can only make the rest look torn: what is
                // kept is then an unaltered prefix of whole frames, as after a
                // truncation (a rollback, which recovery checks against the
                // WAL), never altered content.
                Ok(l) => {
                    let v = l.valid_len as usize;
                    assert!(l.torn_bytes > 0 && i >= v, "flip at {i} accepted");
                    let prefix = parse(&bytes[..v], p()).unwrap();
                    assert_eq!(prefix.state, l.state, "flip at {i}");
                }
            }
        }
    }

    #[test]
    fn truncation_drops_only_whole_frames() {
        let (bytes, auth) = sample();
        let full = parse(&bytes, p()).unwrap();
        for n in 0..bytes.len() {
            match parse(&bytes[..n], p()) {
                Err(e) => assert!(n < full.snapshot_len as usize, "cut at {n}: {e}"),
                Ok(l) => {
                    l.authenticate(&auth, p()).unwrap();
                    assert_eq!(l.valid_len + l.torn_bytes, n as u64);
                    assert!(l.state.generation <= 5);
                }
            }
        }
    }

    #[test]
    fn zero_tail_is_torn() {
        let (mut bytes, auth) = sample();
        let n = bytes.len();
        bytes.extend_from_slice(&[0u8; 300]);
        let l = parse(&bytes, p()).unwrap();
        l.authenticate(&auth, p()).unwrap();
        assert_eq!((l.valid_len, l.torn_bytes), (n as u64, 300));
    }

    /// What an attacker with write access but no KEK can do: rewrite the
    /// frames unkeyed (the constant is public).  Refused.
    #[test]
    fn unkeyed_rewrite_of_keys_is_refused() {
        let (bytes, _) = sample();
        let mut ks = parse(&bytes, p()).unwrap().state;
        ks.keys.retain(|f, _| f.rel != 10);
        let (forged, _) = encode_snapshot_unchecked(&ks);
        let err = parse(&forged, p()).err().expect("refused").to_string();
        assert!(err.contains("unauthenticated but sets a master key or table keys"), "{err}");
    }

    fn encode_snapshot_unchecked(ks: &KeyStore) -> (Vec<u8>, [u8; TAG_LEN]) {
        let (frame, tag) = encode_frame(&first_prev_tag(), KIND_SNAPSHOT, ks.generation, &json(ks), None);
        let mut out = header().to_vec();
        out.extend_from_slice(&frame);
        (out, tag)
    }

    #[test]
    fn removing_a_middle_frame_breaks_the_chain() {
        let (bytes, auth) = sample();
        // Find frame boundaries.
        let mut bounds = vec![HEADER_LEN];
        let mut pos = HEADER_LEN;
        while pos < bytes.len() {
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            pos += FRAME_OVERHEAD + len;
            bounds.push(pos);
        }
        // Drop the last frame but one (an AddKey), keep the local removal
        // after it: generations no longer follow, and the chain is broken.
        let k = bounds.len() - 3;
        let mut cut = bytes[..bounds[k]].to_vec();
        cut.extend_from_slice(&bytes[bounds[k + 1]..]);
        let r = parse(&cut, p()).and_then(|l| l.authenticate(&auth, p()));
        assert!(r.is_err());
    }

    #[test]
    fn unkeyed_frame_after_keyed_is_refused() {
        let (mut bytes, auth) = sample();
        let l = parse(&bytes, p()).unwrap();
        let (f, _) = encode_change(
            &l.last_tag,
            6,
            &Change::AddProvider(ProviderEntry {
                name: "x".into(),
                kind: "env".into(),
                options: serde_json::json!({}),
            }),
            None,
        );
        bytes.extend_from_slice(&f);
        let err = parse(&bytes, p()).err().expect("refused").to_string();
        assert!(err.contains("unauthenticated but follows authenticated"), "{err}");
        let _ = auth;
    }

    #[test]
    fn header_checks() {
        let (bytes, _) = sample();
        let mut b = bytes.clone();
        b[8] = 1;
        assert!(parse(&b, p()).err().unwrap().to_string().contains("unsupported format version 1"));
        assert!(parse(b"PGTDEKS", p()).err().unwrap().to_string().contains("truncated"));
        assert!(parse(&bytes[..HEADER_LEN], p()).err().unwrap().to_string().contains("no snapshot"));
    }

    /// RFC 5869 test case 1 (HKDF-SHA256) through the same crate and call.
    #[test]
    fn hkdf_rfc5869_case_1() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut okm = [0u8; 42];
        hkdf::Hkdf::<Sha256>::new(Some(&salt), &ikm).expand(&info, &mut okm).unwrap();
        let want = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865";
        let got: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
    }

    /// RFC 4231 test case 2 (HMAC-SHA256).
    #[test]
    fn hmac_rfc4231_case_2() {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let got: String = m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn replace_refuses_a_planted_symlink_and_append_does_not_follow() {
        let dir = std::env::temp_dir().join(format!("tde-sf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keystore");
        let (bytes, _) = sample();
        replace(&path, &bytes).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let victim = dir.join("victim");
        std::fs::write(&victim, b"").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("keystore.tmp")).unwrap();
        assert!(replace(&path, &bytes).is_err(), "a symlink at the temporary path is refused");
        assert_eq!(std::fs::read(&victim).unwrap(), b"");
        std::fs::remove_file(dir.join("keystore.tmp")).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(append(&link, b"x").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"");
        append(&path, b"tail").unwrap();
        assert!(std::fs::read(&path).unwrap().ends_with(b"tail"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
