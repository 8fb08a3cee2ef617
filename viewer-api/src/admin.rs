//! `viewer-api --config FILE admin <command>`: manage clinics, users and
//! tokens, and read the audit log, directly on the index (run on the server).
//!
//! Passwords are read from standard input (one line), never from arguments,
//! which other local users can see in the process list.

use std::io::BufRead;
use std::time::Duration;

use consortium_config::Config;
use rusqlite::params;

use crate::auth::{self, Role};
use crate::db::Db;
use crate::error::{ApiError, Result};

pub const USAGE: &str = "usage: viewer-api --config FILE admin <command>
commands:
  create-clinic ID NAME
  create-user USERNAME --role ROLE --clinic CLINIC [--name DISPLAY_NAME]
                        (password: first line of standard input, at least 8 characters;
                         roles: technician, radiologist, clinic_staff, administrator)
  set-password USERNAME  (new password on standard input)
  disable-user USERNAME
  list-users
  issue-token USERNAME [--ttl SECONDS]   (prints a bearer token)
  audit [--limit N] [--user USERNAME]    (newest first)";

/// Runs one admin command; prints its result on standard output.
pub fn run(config: &Config, args: &[String]) -> Result<()> {
    let db = Db::open_configured(config)?;
    let usage = || ApiError::InvalidArgument(USAGE.into());
    let (command, rest) = args.split_first().ok_or_else(usage)?;
    let flag = |name: &str| -> Option<String> {
        rest.iter()
            .position(|a| a == name)
            .and_then(|i| rest.get(i + 1))
            .cloned()
    };
    let positional = |i: usize| rest.get(i).filter(|a| !a.starts_with("--")).cloned();
    match command.as_str() {
        "create-clinic" => {
            let (id, name) = (
                positional(0).ok_or_else(usage)?,
                positional(1).ok_or_else(usage)?,
            );
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ApiError::InvalidArgument(
                    "a clinic id is 1 to 64 of A-Z, a-z, 0-9, _ and -".into(),
                ));
            }
            db.save_clinics([(id.as_str(), name.as_str())])?;
            audit_admin(&db, "Admin create-clinic", format!("clinic {id}"))?;
            println!("clinic {id} saved");
        }
        "create-user" => {
            let username = positional(0).ok_or_else(usage)?;
            let role = flag("--role")
                .and_then(|r| Role::parse(&r))
                .ok_or_else(|| ApiError::InvalidArgument(format!("--role is required\n{USAGE}")))?;
            let clinic = flag("--clinic").ok_or_else(|| {
                ApiError::InvalidArgument(format!("--clinic is required\n{USAGE}"))
            })?;
            let name = flag("--name").unwrap_or_default();
            // Radiologists read every clinic's patients: the county's staff.
            let county = config
                .clinics
                .iter()
                .any(|c| c.id == clinic && c.role == consortium_config::ClinicRole::County);
            if role == Role::Radiologist && !county {
                return Err(ApiError::InvalidArgument(format!(
                    "a radiologist belongs to a clinic with role \"county\" in the configuration, not `{clinic}`"
                )));
            }
            let password = read_password()?;
            db.write_blocking(|c| {
                auth::create_user(c, &username, &name, role, &clinic, &password)
            })?;
            audit_admin(
                &db,
                "Admin create-user",
                format!("user {username}, role {}, clinic {clinic}", role.as_str()),
            )?;
            println!(
                "user {username} created ({}, clinic {clinic})",
                role.as_str()
            );
        }
        "set-password" => {
            let username = positional(0).ok_or_else(usage)?;
            let password = read_password()?;
            auth::check_new_password(&password)?;
            let hash = auth::hash_password(&password)?;
            // A new password is often the answer to a leak: old tokens go too.
            update_user_and_revoke(
                &db,
                "UPDATE users SET password_hash = ?2 WHERE username = ?1",
                &username,
                Some(&hash),
            )?;
            audit_admin(&db, "Admin set-password", format!("user {username}"))?;
            println!("password of {username} changed and their tokens revoked");
        }
        "disable-user" => {
            let username = positional(0).ok_or_else(usage)?;
            update_user_and_revoke(
                &db,
                "UPDATE users SET disabled = 1 WHERE username = ?1",
                &username,
                None,
            )?;
            audit_admin(&db, "Admin disable-user", format!("user {username}"))?;
            println!("user {username} disabled and their tokens revoked");
        }
        "list-users" => {
            db.write_blocking(|c| {
                let mut stmt = c.prepare(
                    "SELECT username, role, clinic_id, display_name, disabled FROM users ORDER BY username",
                )?;
                let mut rows = stmt.query([])?;
                println!("username\trole\tclinic\tname\tdisabled");
                while let Some(r) = rows.next()? {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        if r.get::<_, bool>(4)? { "yes" } else { "no" }
                    );
                }
                Ok(())
            })?;
        }
        "issue-token" => {
            let username = positional(0).ok_or_else(usage)?;
            let asked = flag("--ttl")
                .map(|t| {
                    t.parse::<u64>()
                        .map_err(|_| ApiError::InvalidArgument("--ttl is seconds".into()))
                })
                .transpose()?;
            // Without --ttl: the configured login lifetime, within the cap.
            let ttl = asked.unwrap_or(
                config
                    .viewer
                    .as_ref()
                    .map_or(8 * 3600, |v| v.token_lifetime_s)
                    .min(MAX_ISSUED_TTL_S),
            );
            if ttl > MAX_ISSUED_TTL_S {
                return Err(ApiError::InvalidArgument(format!(
                    "--ttl is at most {MAX_ISSUED_TTL_S} seconds (7 days)"
                )));
            }
            let (token, expires) = db.write_blocking(|c| {
                let user = auth::find_user(c, &username)?
                    .filter(|u| !u.disabled)
                    .ok_or_else(|| {
                        ApiError::InvalidArgument(format!("no active user `{username}`"))
                    })?;
                auth::issue_token(c, user.pk, Duration::from_secs(ttl))
            })?;
            // A token acts as that user: who minted it is on record.
            audit_admin(
                &db,
                "Admin issue-token",
                format!("token for {username}, {ttl} s"),
            )?;
            println!("{token}");
            eprintln!("token for {username}, expires at Unix time {expires}");
        }
        "audit" => {
            let limit: i64 = flag("--limit").and_then(|l| l.parse().ok()).unwrap_or(50);
            let user = flag("--user").unwrap_or_default();
            // The log names patients: reading it is itself on record.
            audit_admin(&db, "Admin audit", format!("limit {limit}, user {user:?}"))?;
            db.write_blocking(|c| {
                let mut stmt = c.prepare(
                    "SELECT at, CASE WHEN username != '' THEN username ELSE calling_ae END, clinic_id, peer,
                            action, study_uid, patient_ref, detail, outcome, matches
                     FROM audit WHERE ?1 = '' OR username = ?1 ORDER BY pk DESC LIMIT ?2",
                )?;
                let mut rows = stmt.query(params![user, limit])?;
                println!("at\twho\tclinic\tpeer\taction\tstudy\tpatient\tdetail\toutcome\tmatches");
                while let Some(r) = rows.next()? {
                    // Values from the network (a typed user name, a
                    // requested UID) may hold control characters: shown
                    // escaped, so no row can forge or hide another.
                    let cols: Vec<String> = (0..9)
                        .map(|i| r.get::<_, String>(i).map(|v| printable(&v)))
                        .collect::<Result<_, _>>()?;
                    println!("{}\t{}", cols.join("\t"), r.get::<_, i64>(9)?);
                }
                Ok(())
            })?;
        }
        _ => return Err(usage()),
    }
    Ok(())
}

/// Runs `update` on a user (`?1` its name, `?2` the optional value) and
/// revokes every token the user holds, in one transaction.
fn update_user_and_revoke(
    db: &Db,
    update: &str,
    username: &str,
    value: Option<&str>,
) -> Result<()> {
    db.write_blocking(|c| {
        let tx = c.transaction()?;
        let n = match value {
            Some(v) => tx.execute(update, params![username, v])?,
            None => tx.execute(update, params![username])?,
        };
        if n == 0 {
            return Err(ApiError::InvalidArgument(format!("no user `{username}`")));
        }
        tx.execute(
            "UPDATE sessions SET revoked = 1
             WHERE user_pk = (SELECT pk FROM users WHERE username = ?1)",
            [username],
        )?;
        tx.commit()?;
        Ok(())
    })
}

/// Longest lifetime of a token issued by an administrator.
const MAX_ISSUED_TTL_S: u64 = 7 * 24 * 3600;

/// Records an administrator's action, with the local account that ran it
/// (the admin command runs on the server).
fn audit_admin(db: &Db, action: &'static str, detail: String) -> Result<()> {
    let who = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    crate::audit::record_blocking(
        db,
        crate::audit::Entry {
            action,
            username: format!("admin-cli:{who}"),
            peer: "local".into(),
            detail,
            outcome: "success".into(),
            ..Default::default()
        },
    )
}

/// `value` with control characters (tabs, newlines, terminal escapes)
/// escaped.
fn printable(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn read_password() -> Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| {
        ApiError::InvalidArgument(format!("cannot read the password from standard input: {e}"))
    })?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
