//! tde-audit-check: verifies the audit trail of a stopped cluster.
//!
//! Usage: tde-audit-check PGDATA [--provider-options JSON]
//!
//! Exit status: 0 the trail is intact, 1 it is not (each problem on
//! stderr), 2 it could not be checked (no key store, master key
//! unavailable, ...).  docs/audit.md explains what is checked.
//!
//! It lives in tde-kms so that it reaches every provider kind (a master key
//! in AWS KMS, Vault, an HSM, ...), with the same options as the server.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut pgdata = None;
    let mut options = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--provider-options" => match it.next().map(|s| serde_json::from_str(s)) {
                Some(Ok(v)) => options = Some(v),
                _ => return usage("--provider-options needs a JSON object"),
            },
            "-h" | "--help" => return usage(""),
            _ if pgdata.is_none() => pgdata = Some(PathBuf::from(a)),
            _ => return usage(&format!("unexpected argument \"{a}\"")),
        }
    }
    let Some(pgdata) = pgdata else { return usage("PGDATA is required") };
    match tde_core::offline::check_audit_with(&pgdata, options, &tde_kms::from_config) {
        Ok(r) if r.ok() => {
            println!(
                "audit trail intact: {} records{}",
                r.records,
                if r.beyond_head > 0 {
                    format!(" ({} after the key store's head: the cluster did not shut down cleanly)", r.beyond_head)
                } else {
                    String::new()
                }
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            for p in &r.problems {
                eprintln!("tde-audit-check: {p}");
            }
            println!("audit trail NOT intact ({} records read)", r.records);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("tde-audit-check: cannot check: {e}");
            ExitCode::from(2)
        }
    }
}

fn usage(why: &str) -> ExitCode {
    if !why.is_empty() {
        eprintln!("tde-audit-check: {why}");
    }
    eprintln!("usage: tde-audit-check PGDATA [--provider-options JSON]");
    ExitCode::from(2)
}
