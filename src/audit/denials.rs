//! Permission denials on tde's own functions and views, audited.
//!
//! Why this file exists: everything tde has is revoked from PUBLIC, so a
//! role outside tde_admin is stopped by PostgreSQL's own privilege check,
//! which runs in the executor and has no hook.  So the check is made one
//! step earlier, after parse analysis (`post_parse_analyze_hook`): a query
//! that names a tde function or view the current role may not use gets its
//! denial recorded in the audit trail, then the very error PostgreSQL would
//! raise (`aclcheck_error`: "permission denied for function tde_rotate_key").
//!
//! Cost: one walk over each query tree; a catalog lookup only for objects
//! created after initdb whose name starts with `tde_`, and the extension
//! check only for those.

use std::ffi::{c_void, CStr};

use pgrx::pg_sys;

use super::{entry, record, Op, Outcome};

static mut PREV_POST_PARSE: pg_sys::post_parse_analyze_hook_type = None;

pub fn init() {
    // SAFETY: installing a hook from _PG_init, saving the previous one.
    unsafe {
        PREV_POST_PARSE = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(post_parse);
    }
}

/// What a query names that the current role may not use.
enum Denied {
    Function(String),
    View(String),
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn post_parse(
    pstate: *mut pg_sys::ParseState,
    query: *mut pg_sys::Query,
    jstate: *mut pg_sys::JumbleState,
) {
    // SAFETY: chaining to the previous hook with PostgreSQL's arguments.
    unsafe {
        if let Some(prev) = PREV_POST_PARSE {
            prev(pstate, query, jstate);
        }
    }
    let mut found: Option<Denied> = None;
    // SAFETY: `query` is the analysed query, valid for this call; the
    // walker only reads it.
    unsafe { walk(query as *mut pg_sys::Node, &mut found as *mut Option<Denied> as *mut c_void) };
    if let Some(d) = found {
        let (object, kind) = match &d {
            Denied::Function(n) => (format!("function {n}"), pg_sys::ObjectType::OBJECT_FUNCTION),
            Denied::View(n) => (format!("view {n}"), pg_sys::ObjectType::OBJECT_VIEW),
        };
        record(vec![entry(Op::PermissionDenied, &object, Outcome::Denied)]);
        let name = match d {
            Denied::Function(n) | Denied::View(n) => std::ffi::CString::new(n).unwrap_or_default(),
        };
        // SAFETY: raises PostgreSQL's own permission error (does not return).
        unsafe { pg_sys::aclcheck_error(pg_sys::AclResult::ACLCHECK_NO_PRIV, kind, name.as_ptr()) };
    }
}

fn tde_named(p: *const std::ffi::c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated, palloc'd name.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    s.starts_with("tde_").then_some(s)
}

fn is_ours(class: pg_sys::Oid, oid: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups inside the transaction that analyses the query.
    unsafe {
        let ext = pg_sys::get_extension_oid(c"tde".as_ptr(), true);
        ext != pg_sys::InvalidOid && pg_sys::getExtensionOfObject(class, oid) == ext
    }
}

fn check_function(funcid: pg_sys::Oid) -> Option<Denied> {
    if u32::from(funcid) < pg_sys::FirstNormalObjectId {
        return None;
    }
    // SAFETY: syscache lookup; NULL if missing.
    let name = tde_named(unsafe { pg_sys::get_func_name(funcid) })?;
    if !is_ours(pg_sys::ProcedureRelationId, funcid) {
        return None;
    }
    // SAFETY: a privilege lookup for the current user.
    let ok = unsafe {
        pg_sys::object_aclcheck(pg_sys::ProcedureRelationId, funcid, pg_sys::GetUserId(), pg_sys::ACL_EXECUTE as _)
    } == pg_sys::AclResult::ACLCHECK_OK;
    (!ok).then_some(Denied::Function(name))
}

fn check_relation(relid: pg_sys::Oid) -> Option<Denied> {
    if u32::from(relid) < pg_sys::FirstNormalObjectId {
        return None;
    }
    // SAFETY: syscache lookup; NULL if missing.
    let name = tde_named(unsafe { pg_sys::get_rel_name(relid) })?;
    if !is_ours(pg_sys::RelationRelationId, relid) {
        return None;
    }
    // SAFETY: a privilege lookup for the current user.
    let ok = unsafe { pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as _) }
        == pg_sys::AclResult::ACLCHECK_OK;
    (!ok).then_some(Denied::View(name))
}

/// A tree walker (PostgreSQL's query_tree_walker / expression_tree_walker
/// protocol: return true to stop) that stops at the first denial.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, ctx: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: `ctx` is the `Option<Denied>` of post_parse, alive for the
    // walk; `node` is a valid node of the analysed query.
    unsafe {
        let found = &mut *(ctx as *mut Option<Denied>);
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => {
                let q = node as *mut pg_sys::Query;
                let rtable = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg((*q).rtable);
                for rte in rtable.iter_ptr() {
                    if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION {
                        if let Some(d) = check_relation((*rte).relid) {
                            *found = Some(d);
                            return true;
                        }
                    }
                }
                // EXPLAIN, CREATE TABLE AS and DECLARE CURSOR hold their
                // analysed query in the utility statement.
                let u = (*q).utilityStmt;
                if !u.is_null() {
                    let inner = match (*u).type_ {
                        pg_sys::NodeTag::T_ExplainStmt => (*(u as *mut pg_sys::ExplainStmt)).query,
                        pg_sys::NodeTag::T_CreateTableAsStmt => (*(u as *mut pg_sys::CreateTableAsStmt)).query,
                        pg_sys::NodeTag::T_DeclareCursorStmt => (*(u as *mut pg_sys::DeclareCursorStmt)).query,
                        _ => std::ptr::null_mut(),
                    };
                    // Only an analysed query (never a raw parse tree).
                    if !inner.is_null() && (*inner).type_ == pg_sys::NodeTag::T_Query {
                        return walk(inner, ctx);
                    }
                    return false;
                }
                return pg_sys::query_tree_walker_impl(q, Some(walk), ctx, 0);
            }
            pg_sys::NodeTag::T_FuncExpr => {
                if let Some(d) = check_function((*(node as *mut pg_sys::FuncExpr)).funcid) {
                    *found = Some(d);
                    return true;
                }
            }
            _ => {}
        }
        pg_sys::expression_tree_walker_impl(node, Some(walk), ctx)
    }
}
