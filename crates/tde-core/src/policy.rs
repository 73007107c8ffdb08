//! What is encrypted: the one rule, over plain inputs.
//!
//! Why this exists: the decision "does this new relation file get a key?"
//! is asked from several places in the server -- the table access method's
//! callbacks, the core patch's RelationCreateStorage hook, the post-create
//! object-access hook, the sequence sync after OWNED BY -- and
//! `tde.enforce_encryption` asks a related one.  The server-side adapters
//! (src/am.rs, src/hooks.rs) only gather the inputs below from the catalog
//! and the hook arguments; the rule itself is here, where `cargo test`
//! checks every case.
//!
//! The rule: a table is encrypted iff it uses tde_heap (its TOAST table and
//! TOAST index follow it); an index iff its table is; an owned sequence iff
//! its owner is; a copy of an encrypted file is encrypted.  Nothing is ever
//! decided from a guess: when the inputs do not decide yet (a brand-new index
//! whose pg_index row is not written), the answer is "later", and the
//! post-create hook decides before any page is written.

/// What kind of relation a new file belongs to, as far as the rule cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A table or materialized view (or a TOAST table) created by a table AM
    /// callback; `tde_heap` says whether that AM is tde_heap.
    Table { tde_heap: bool },
    /// An index; `table_tde_heap` is None while its table is not known yet.
    Index { table_tde_heap: Option<bool> },
    /// A sequence; `owner_tde_heap` is None while it has no owner.
    Sequence { owner_tde_heap: Option<bool> },
    /// Anything else, or a file created without a relation (a database copy).
    Other,
}

/// The inputs for one new relation file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewFile {
    pub kind: Kind,
    /// Whether the file it is made from (a rewrite's old file, a copy's
    /// source) is encrypted; None when it is made from nothing.
    pub source_encrypted: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Encrypt,
    Plain,
    /// Not decidable yet; the caller decides again before any page is written.
    Later,
}

/// Whether a new relation file is encrypted.
pub fn decide(f: &NewFile) -> Decision {
    let from_source = |s: Option<bool>| match s {
        Some(true) => Decision::Encrypt,
        _ => Decision::Plain,
    };
    match f.kind {
        Kind::Table { tde_heap: true } => Decision::Encrypt,
        Kind::Table { tde_heap: false } => Decision::Plain,
        Kind::Index { table_tde_heap: Some(true) } | Kind::Sequence { owner_tde_heap: Some(true) } => Decision::Encrypt,
        Kind::Index { table_tde_heap: Some(false) } | Kind::Sequence { owner_tde_heap: Some(false) } => Decision::Plain,
        // A brand-new index: its pg_index row comes later, in the same command.
        Kind::Index { table_tde_heap: None } if f.source_encrypted.is_none() => Decision::Later,
        Kind::Index { table_tde_heap: None } | Kind::Sequence { owner_tde_heap: None } | Kind::Other => {
            from_source(f.source_encrypted)
        }
    }
}

/// What `tde.enforce_encryption` looks at when a relation is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Created {
    /// A table or materialized view (not an index, sequence, view, ...).
    pub user_table: bool,
    /// In a system catalog or TOAST namespace.
    pub system: bool,
    pub tde_heap: bool,
    /// make_new_heap's transient copy of a table being rewritten in place
    /// with the access method it already has.
    pub rewrite_keeping_am: bool,
}

/// Whether creating this relation is allowed while `tde.enforce_encryption`
/// is on.
pub fn allowed_under_enforcement(c: &Created) -> bool {
    !c.user_table || c.system || c.tde_heap || c.rewrite_keeping_am
}

/// Whether `ALTER TABLE ... SET ACCESS METHOD target` is allowed while
/// `tde.enforce_encryption` is on.
pub fn set_access_method_allowed(target: &str) -> bool {
    target == "tde_heap"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(kind: Kind, source_encrypted: Option<bool>) -> Decision {
        decide(&NewFile { kind, source_encrypted })
    }

    #[test]
    fn tables_follow_their_access_method_whatever_the_source() {
        for src in [None, Some(true), Some(false)] {
            assert_eq!(f(Kind::Table { tde_heap: true }, src), Decision::Encrypt);
            // SET ACCESS METHOD heap rewrites an encrypted table into a plain one.
            assert_eq!(f(Kind::Table { tde_heap: false }, src), Decision::Plain);
        }
    }

    #[test]
    fn indexes_follow_their_table() {
        assert_eq!(f(Kind::Index { table_tde_heap: Some(true) }, None), Decision::Encrypt);
        assert_eq!(f(Kind::Index { table_tde_heap: Some(false) }, Some(true)), Decision::Plain);
        // REINDEX / TRUNCATE / SET TABLESPACE of an index without a known
        // table row yet: the old file decides.
        assert_eq!(f(Kind::Index { table_tde_heap: None }, Some(true)), Decision::Encrypt);
        assert_eq!(f(Kind::Index { table_tde_heap: None }, Some(false)), Decision::Plain);
        // CREATE INDEX: decided at post-create, never guessed.
        assert_eq!(f(Kind::Index { table_tde_heap: None }, None), Decision::Later);
    }

    #[test]
    fn sequences_follow_their_owner_or_their_old_file() {
        assert_eq!(f(Kind::Sequence { owner_tde_heap: Some(true) }, None), Decision::Encrypt);
        assert_eq!(f(Kind::Sequence { owner_tde_heap: Some(false) }, Some(true)), Decision::Plain);
        assert_eq!(f(Kind::Sequence { owner_tde_heap: None }, Some(true)), Decision::Encrypt);
        assert_eq!(f(Kind::Sequence { owner_tde_heap: None }, None), Decision::Plain);
    }

    #[test]
    fn copies_follow_their_source() {
        assert_eq!(f(Kind::Other, Some(true)), Decision::Encrypt);
        assert_eq!(f(Kind::Other, Some(false)), Decision::Plain);
        assert_eq!(f(Kind::Other, None), Decision::Plain);
    }

    #[test]
    fn enforcement() {
        let base = Created { user_table: true, system: false, tde_heap: false, rewrite_keeping_am: false };
        assert!(!allowed_under_enforcement(&base), "a plain user table is refused");
        assert!(allowed_under_enforcement(&Created { tde_heap: true, ..base }));
        assert!(allowed_under_enforcement(&Created { system: true, ..base }));
        assert!(allowed_under_enforcement(&Created { user_table: false, ..base }));
        assert!(allowed_under_enforcement(&Created { rewrite_keeping_am: true, ..base }));
        assert!(set_access_method_allowed("tde_heap"));
        assert!(!set_access_method_allowed("heap"));
        assert!(!set_access_method_allowed("heap2"));
    }
}
