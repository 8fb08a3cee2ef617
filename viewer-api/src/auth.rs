//! Identity: users and roles, argon2 password hashes, bearer tokens, the
//! failed-login limiter, and who a request comes from.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::db::{Db, now_unix};
use crate::error::{ApiError, Result};

/// What a user is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends studies from a township clinic; sees its own clinic's studies.
    Technician,
    /// Reads every study sent to the center; claims worklist items.
    Radiologist,
    /// A member clinic's staff; sees its own clinic's patients.
    ClinicStaff,
    /// Manages users, reads the audit log; no patient data.
    Administrator,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Technician,
        Role::Radiologist,
        Role::ClinicStaff,
        Role::Administrator,
    ];

    /// The name stored in the index and used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Technician => "technician",
            Role::Radiologist => "radiologist",
            Role::ClinicStaff => "clinic_staff",
            Role::Administrator => "administrator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn to_proto(self) -> consortium_proto::v1::Role {
        use consortium_proto::v1::Role as P;
        match self {
            Role::Technician => P::Technician,
            Role::Radiologist => P::Radiologist,
            Role::ClinicStaff => P::ClinicStaff,
            Role::Administrator => P::Administrator,
        }
    }
}

/// The authenticated user behind a call.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_pk: i64,
    pub username: String,
    pub display_name: String,
    pub role: Role,
    pub clinic_id: String,
    /// Peer address, for the audit log.
    pub peer: String,
    pub token_hash: String,
    pub expires_at: i64,
}

impl Caller {
    /// Patient data of every clinic (radiologists read what was sent to the center).
    pub fn sees_all_clinics(&self) -> bool {
        self.role == Role::Radiologist
    }

    /// Whether the caller may see patient data of `clinic_id`.
    pub fn may_see_clinic(&self, clinic_id: &str) -> bool {
        match self.role {
            Role::Radiologist => true,
            Role::Technician | Role::ClinicStaff => self.clinic_id == clinic_id,
            Role::Administrator => false,
        }
    }

    /// Refuses administrators (and any future role without patient access).
    pub fn require_patient_access(&self) -> Result<()> {
        if self.role == Role::Administrator {
            return Err(ApiError::PermissionDenied(
                "administrators have no access to patient data".into(),
            ));
        }
        Ok(())
    }

    pub fn to_proto(&self) -> consortium_proto::v1::User {
        consortium_proto::v1::User {
            username: self.username.clone(),
            display_name: self.display_name.clone(),
            role: self.role.to_proto() as i32,
            clinic_id: self.clinic_id.clone(),
        }
    }
}

/// An argon2id hash of `password` with a fresh random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| ApiError::Internal(format!("random: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| ApiError::Internal(format!("hashing: {e}")))?
        .to_string())
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A new bearer token: 32 random bytes, hex.
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::Internal(format!("random: {e}")))?;
    Ok(storage::spool::hex(&bytes))
}

/// What the index keeps of a token: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    storage::spool::hex(&Sha256::digest(token.as_bytes()))
}

/// A user row.
#[derive(Debug, Clone)]
pub struct UserRow {
    pub pk: i64,
    pub username: String,
    pub display_name: String,
    pub role: Role,
    pub clinic_id: String,
    pub password_hash: String,
    pub disabled: bool,
}

pub fn find_user(conn: &Connection, username: &str) -> Result<Option<UserRow>> {
    Ok(conn
        .query_row(
            "SELECT pk, username, display_name, role, clinic_id, password_hash, disabled
             FROM users WHERE username = ?1",
            [username],
            |r| {
                Ok(UserRow {
                    pk: r.get(0)?,
                    username: r.get(1)?,
                    display_name: r.get(2)?,
                    role: Role::parse(&r.get::<_, String>(3)?).unwrap_or(Role::ClinicStaff),
                    clinic_id: r.get(4)?,
                    password_hash: r.get(5)?,
                    disabled: r.get(6)?,
                })
            },
        )
        .optional()?)
}

/// Creates a user (admin command, demo setup). The clinic must exist.
/// A password a user may be given: at least 8 characters.
pub fn check_new_password(password: &str) -> Result<()> {
    if password.chars().count() < 8 {
        return Err(ApiError::InvalidArgument(
            "a password has at least 8 characters".into(),
        ));
    }
    Ok(())
}

pub fn create_user(
    conn: &Connection,
    username: &str,
    display_name: &str,
    role: Role,
    clinic_id: &str,
    password: &str,
) -> Result<()> {
    if username.is_empty() || username.len() > 64 || username.contains(char::is_whitespace) {
        return Err(ApiError::InvalidArgument(
            "a user name is 1 to 64 characters without spaces".into(),
        ));
    }
    check_new_password(password)?;
    let clinic: Option<String> = conn
        .query_row("SELECT id FROM clinics WHERE id = ?1", [clinic_id], |r| {
            r.get(0)
        })
        .optional()?;
    if clinic.is_none() {
        return Err(ApiError::InvalidArgument(format!(
            "unknown clinic `{clinic_id}`"
        )));
    }
    let hash = hash_password(password)?;
    let now = storage::utc_timestamp(std::time::SystemTime::now());
    let inserted = conn.execute(
        "INSERT INTO users (username, display_name, role, clinic_id, password_hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (username) DO NOTHING",
        params![username, display_name, role.as_str(), clinic_id, hash, now],
    )?;
    if inserted == 0 {
        return Err(ApiError::InvalidArgument(format!(
            "user `{username}` already exists"
        )));
    }
    Ok(())
}

/// Issues a token for `user_pk` valid for `lifetime`; returns (token, expiry).
pub fn issue_token(conn: &Connection, user_pk: i64, lifetime: Duration) -> Result<(String, i64)> {
    let token = new_token()?;
    let now = now_unix();
    let expires = now + lifetime.as_secs() as i64;
    // Sessions expired for a day are of no use to anyone: drop them here.
    conn.execute("DELETE FROM sessions WHERE expires_at < ?1", [now - 86_400])?;
    conn.execute(
        "INSERT INTO sessions (token_hash, user_pk, issued_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        params![token_hash(&token), user_pk, now, expires],
    )?;
    Ok((token, expires))
}

/// Failed logins per key (user name from one address, peer address, user
/// name from anywhere), with a lock-out that doubles after each failure
/// past the threshold; and the addresses each user name signed in from.
#[derive(Default)]
struct Limiter {
    entries: HashMap<String, Failures>,
    /// User name -> (address scope, last successful login), newest last.
    known: HashMap<String, Vec<(String, Instant)>>,
}

struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// Failures per user name (from one address) before a lock-out.
const USER_THRESHOLD: u32 = 5;
/// Failures per peer address before a lock-out (many users behind one NAT).
const PEER_THRESHOLD: u32 = 20;
/// Failures per user name from any address before a lock-out of the
/// addresses that name has not signed in from: guesses spread over many
/// addresses (each under its own limits) meet a limit too, while the
/// user's own workstations stay open.
const NAME_THRESHOLD: u32 = 20;
/// An address a user signed in from counts as theirs this long.
const KNOWN_FOR: Duration = Duration::from_secs(30 * 86_400);
/// Addresses remembered per user name (the most recent).
const KNOWN_PER_USER: usize = 16;
/// First lock-out; doubles with each further failure, at most `MAX_LOCK`.
const FIRST_LOCK: Duration = Duration::from_secs(30);
const MAX_LOCK: Duration = Duration::from_secs(15 * 60);
/// Failures older than this are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

impl Limiter {
    fn locked_for(&mut self, key: &str, now: Instant) -> Option<Duration> {
        let e = self.entries.get(key)?;
        e.locked_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    fn fail(&mut self, key: String, threshold: u32, now: Instant) {
        if self.entries.len() > 100_000 {
            self.entries
                .retain(|_, e| now.duration_since(e.last) < FORGET_AFTER);
        }
        let e = self.entries.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            locked_until: None,
        });
        if now.duration_since(e.last) > FORGET_AFTER {
            e.count = 0;
        }
        e.count += 1;
        e.last = now;
        if e.count >= threshold {
            let doublings = (e.count - threshold).min(10);
            e.locked_until = Some(now + (FIRST_LOCK * (1 << doublings)).min(MAX_LOCK));
        }
    }

    fn succeed(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Takes back one counted attempt that turned out to succeed.
    fn unfail(&mut self, key: &str) {
        if let Some(e) = self.entries.get_mut(key) {
            e.count = e.count.saturating_sub(1);
        }
    }

    /// Whether `username` signed in from `scope` within [`KNOWN_FOR`].
    fn is_known(&self, username: &str, scope: &str, now: Instant) -> bool {
        self.known.get(username).is_some_and(|places| {
            places
                .iter()
                .any(|(s, at)| s == scope && now.duration_since(*at) < KNOWN_FOR)
        })
    }

    fn remember(&mut self, username: &str, scope: &str, now: Instant) {
        if self.known.len() > 100_000 {
            self.known.retain(|_, places| {
                places.retain(|(_, at)| now.duration_since(*at) < KNOWN_FOR);
                !places.is_empty()
            });
        }
        let places = self.known.entry(username.to_string()).or_default();
        places.retain(|(s, _)| s != scope);
        places.push((scope.to_string(), now));
        if places.len() > KNOWN_PER_USER {
            places.remove(0);
        }
    }
}

/// The address failed logins are counted under: an IPv4 address (also
/// one mapped into IPv6) as it is, an IPv6 address as its /64 prefix, the
/// least a single host or home network is given.
pub(crate) fn limiter_scope(peer: &str) -> String {
    match peer.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        _ => peer.to_string(),
    }
}

/// How long a checked token is trusted without asking the index again.
const TOKEN_RECHECK: Duration = Duration::from_secs(2);

/// Logins and token checks.
pub struct Auth {
    db: Db,
    token_lifetime: Duration,
    limiter: Mutex<Limiter>,
    /// Tokens checked in the last [`TOKEN_RECHECK`]: spares a database
    /// round trip per call. Logout here evicts at once; a revocation by the
    /// admin command (another process) takes effect within that time.
    recent: Mutex<HashMap<String, (Caller, Instant)>>,
    /// Logouts so far, counted under `recent`'s lock once the revocation is
    /// committed: a check that read its session before one (so found it
    /// valid) does not put it back in `recent` after that logout evicted it.
    logouts: std::sync::atomic::AtomicU64,
    /// Password checks running at once (one per core).
    hashing: tokio::sync::Semaphore,
    /// Verified against when the user does not exist, so a wrong user name
    /// takes as long as a wrong password.
    dummy_hash: String,
}

impl Auth {
    pub fn new(db: Db, token_lifetime: Duration) -> Result<Auth> {
        Ok(Auth {
            db,
            token_lifetime,
            limiter: Mutex::new(Limiter::default()),
            recent: Mutex::new(HashMap::new()),
            logouts: std::sync::atomic::AtomicU64::new(0),
            hashing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            dummy_hash: hash_password("not a real password")?,
        })
    }

    /// Checks the password and issues a token.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        peer: &str,
    ) -> Result<(String, i64, UserRow)> {
        if username.is_empty() || username.len() > 64 || password.len() > 1024 {
            return Err(ApiError::Unauthenticated("wrong user name or password"));
        }
        // Lock-outs are per user name *from one address*, so nobody can lock
        // a radiologist out from elsewhere; each address also has its own
        // limit across user names. An IPv6 address counts as its /64: one
        // host has a whole /64 to rotate through. Guesses at one name from
        // many addresses lock that name out only for addresses it has not
        // signed in from: its user's workstations stay open.
        let peer = limiter_scope(peer);
        let user_key = format!("user:{username}@{peer}");
        let peer_key = format!("peer:{peer}");
        let name_key = format!("name:{username}");
        {
            let now = Instant::now();
            let mut limiter = self.limiter.lock().expect("limiter lock");
            if let Some(wait) = limiter
                .locked_for(&user_key, now)
                .or_else(|| limiter.locked_for(&peer_key, now))
            {
                return Err(ApiError::ResourceExhausted(format!(
                    "too many failed logins; try again in {} s",
                    wait.as_secs().max(1)
                )));
            }
            if !limiter.is_known(username, &peer, now)
                && let Some(wait) = limiter.locked_for(&name_key, now)
            {
                return Err(ApiError::ResourceExhausted(format!(
                    "too many failed logins for this user name from new addresses; sign in \
                     from a workstation used before, or try again in {} s",
                    wait.as_secs().max(1)
                )));
            }
            // Count the attempt before checking it, so parallel attempts
            // cannot all pass the lock; a success takes it back below.
            limiter.fail(user_key.clone(), USER_THRESHOLD, now);
            limiter.fail(peer_key.clone(), PEER_THRESHOLD, now);
            limiter.fail(name_key.clone(), NAME_THRESHOLD, now);
        }
        // argon2 takes ~19 MiB and a core per check: a few at a time.
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|_| ApiError::Internal("hashing closed".into()))?;
        let name = username.to_string();
        let user = self.db.read(move |c| find_user(c, &name)).await?;
        let hash = user
            .as_ref()
            .filter(|u| !u.disabled)
            .map_or(self.dummy_hash.clone(), |u| u.password_hash.clone());
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || verify_password(&hash, &password)).await?;
        let user = match user.filter(|u| ok && !u.disabled) {
            Some(u) => u,
            None => return Err(ApiError::Unauthenticated("wrong user name or password")),
        };
        {
            let mut limiter = self.limiter.lock().expect("limiter lock");
            limiter.succeed(&user_key);
            limiter.unfail(&peer_key);
            // Not a reset: guesses from elsewhere go on counting.
            limiter.unfail(&name_key);
            limiter.remember(username, &peer, Instant::now());
        }
        let (pk, lifetime) = (user.pk, self.token_lifetime);
        let (token, expires) = self.db.write(move |c| issue_token(c, pk, lifetime)).await?;
        Ok((token, expires, user))
    }

    /// The caller behind a request's `authorization: Bearer <token>`.
    pub async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        peer: String,
    ) -> Result<Caller> {
        let header = metadata
            .get("authorization")
            .ok_or(ApiError::Unauthenticated("missing authorization metadata"))?
            .to_str()
            .map_err(|_| ApiError::Unauthenticated("malformed authorization metadata"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(ApiError::Unauthenticated(
                "authorization must be `Bearer <token>`",
            ))?;
        let hash = token_hash(&token.to_ascii_lowercase());
        let logouts = self.logouts.load(std::sync::atomic::Ordering::SeqCst);
        if let Some((caller, checked)) = self.recent.lock().expect("token cache").get(&hash)
            && checked.elapsed() < TOKEN_RECHECK
            && caller.expires_at > now_unix()
        {
            return Ok(Caller {
                peer,
                ..caller.clone()
            });
        }
        let found = self
            .db
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT u.pk, u.username, u.display_name, u.role, u.clinic_id, u.disabled,
                            s.expires_at, s.revoked, s.token_hash
                     FROM sessions s JOIN users u ON u.pk = s.user_pk WHERE s.token_hash = ?1",
                    [hash],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, bool>(5)?,
                            r.get::<_, i64>(6)?,
                            r.get::<_, bool>(7)?,
                            r.get::<_, String>(8)?,
                        ))
                    },
                )
                .optional()?)
            })
            .await?;
        let Some((pk, username, display_name, role, clinic_id, disabled, expires, revoked, hash)) =
            found
        else {
            return Err(ApiError::Unauthenticated("unknown token"));
        };
        if revoked {
            return Err(ApiError::Unauthenticated("token revoked"));
        }
        if disabled {
            return Err(ApiError::Unauthenticated("user disabled"));
        }
        if expires <= now_unix() {
            return Err(ApiError::Unauthenticated("token expired; log in again"));
        }
        let caller = Caller {
            user_pk: pk,
            username,
            display_name,
            role: Role::parse(&role)
                .ok_or(ApiError::Unauthenticated("user has an unknown role"))?,
            clinic_id,
            peer,
            token_hash: hash.clone(),
            expires_at: expires,
        };
        let mut recent = self.recent.lock().expect("token cache");
        if recent.len() > 10_000 {
            recent.retain(|_, (_, at)| at.elapsed() < TOKEN_RECHECK);
        }
        // Not cached when a logout came between the read and now: it may
        // have revoked this very token (this call still passes, as one
        // that started before the logout).
        if self.logouts.load(std::sync::atomic::Ordering::SeqCst) == logouts {
            recent.insert(hash, (caller.clone(), Instant::now()));
        }
        Ok(caller)
    }

    /// Whether the caller's token still stands (not revoked, not expired,
    /// user not disabled), asking the index, for long-lived streams.
    pub async fn still_valid(&self, caller: &Caller) -> bool {
        let hash = caller.token_hash.clone();
        let now = now_unix();
        self.db
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT 1 FROM sessions s JOIN users u ON u.pk = s.user_pk
                     WHERE s.token_hash = ?1 AND s.revoked = 0 AND s.expires_at > ?2 AND u.disabled = 0",
                    rusqlite::params![hash, now],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
            })
            .await
            .unwrap_or(false)
    }

    /// Revokes the caller's token.
    pub async fn logout(&self, caller: &Caller) -> Result<()> {
        let hash = caller.token_hash.clone();
        let revoked = hash.clone();
        self.db
            .write(move |c| {
                c.execute(
                    "UPDATE sessions SET revoked = 1 WHERE token_hash = ?1",
                    [revoked],
                )?;
                Ok(())
            })
            .await?;
        // Evicted once the revocation is committed, so no check reading
        // the session after this sees it valid.
        let mut recent = self.recent.lock().expect("token cache");
        recent.remove(&hash);
        self.logouts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_count_per_ipv4_address_and_per_ipv6_slash_64() {
        assert_eq!(limiter_scope("192.0.2.7"), "192.0.2.7");
        assert_eq!(limiter_scope("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(limiter_scope("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(
            limiter_scope("2001:db8:1:2:ffff:ffff:ffff:ffff"),
            "2001:db8:1:2::/64"
        );
        assert_ne!(limiter_scope("2001:db8:1:3::1"), "2001:db8:1:2::/64");
        assert_eq!(limiter_scope("unknown"), "unknown");
    }

    /// An index in a fresh directory with one user, `rad1` (password
    /// `pw-rad1-long`), and its `Auth`.
    async fn with_rad1() -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.save_clinics([("county", "County center")]).unwrap();
        db.write(|c| {
            create_user(
                c,
                "rad1",
                "Rad One",
                Role::Radiologist,
                "county",
                "pw-rad1-long",
            )
        })
        .await
        .unwrap();
        (dir, Auth::new(db, Duration::from_secs(3600)).unwrap())
    }

    /// Guesses at one user name spread over many addresses (one each,
    /// under every per-address limit) lock that name out for addresses it
    /// has not signed in from, before any password check there; the
    /// user's own workstation still signs in, and other names are free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guesses_at_one_name_from_many_addresses_lock_only_new_addresses() {
        let (_dir, auth) = with_rad1().await;
        auth.login("rad1", "pw-rad1-long", "10.1.1.1")
            .await
            .unwrap();
        for i in 0..NAME_THRESHOLD {
            let peer = format!("192.0.2.{}", i + 1);
            let guess = auth.login("rad1", "a guess", &peer).await;
            assert!(
                matches!(guess, Err(ApiError::Unauthenticated(_))),
                "guess {i}: {guess:?}"
            );
        }
        let new_place = auth.login("rad1", "pw-rad1-long", "198.51.100.7").await;
        assert!(
            matches!(&new_place, Err(ApiError::ResourceExhausted(m)) if m.contains("workstation")),
            "{new_place:?}"
        );
        auth.login("rad1", "pw-rad1-long", "10.1.1.1")
            .await
            .expect("the workstation rad1 signed in from stays open");
        let other = auth.login("rad2", "a guess", "198.51.100.8").await;
        assert!(
            matches!(other, Err(ApiError::Unauthenticated(_))),
            "{other:?}"
        );
    }

    /// Guesses from addresses that rotate within one /64 meet one lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guesses_rotating_through_an_ipv6_prefix_are_locked_out_together() {
        let (_dir, auth) = with_rad1().await;
        for i in 0..USER_THRESHOLD {
            let peer = format!("2001:db8:1:2::{:x}", i + 1);
            let guess = auth.login("rad1", "a guess", &peer).await;
            assert!(
                matches!(guess, Err(ApiError::Unauthenticated(_))),
                "{guess:?}"
            );
        }
        let locked = auth.login("rad1", "pw-rad1-long", "2001:db8:1:2::99").await;
        assert!(
            matches!(locked, Err(ApiError::ResourceExhausted(_))),
            "{locked:?}"
        );
        // Another network is not locked out.
        assert!(
            auth.login("rad1", "pw-rad1-long", "2001:db8:9:9::1")
                .await
                .is_ok()
        );
    }

    /// A token logged out is refused at once, even when checks of it were
    /// reading its session while the logout ran (they used to put it back
    /// in the cache of recent tokens, where it passed for 2 s more).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_logged_out_during_checks_is_refused_at_once() {
        let (_dir, auth) = with_rad1().await;
        let auth = std::sync::Arc::new(auth);
        for round in 0..40 {
            let (token, _, _) = auth
                .login("rad1", "pw-rad1-long", "127.0.0.1")
                .await
                .unwrap();
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
            let caller = auth.authenticate(&metadata, "p".into()).await.unwrap();
            // Evicted from the cache, so each check below reads the session.
            auth.recent.lock().unwrap().clear();
            let checks: Vec<_> = (0..8)
                .map(|_| {
                    let (auth, metadata) = (auth.clone(), metadata.clone());
                    tokio::spawn(async move { auth.authenticate(&metadata, "p".into()).await })
                })
                .collect();
            tokio::task::yield_now().await;
            auth.logout(&caller).await.unwrap();
            for check in checks {
                let _ = check.await.unwrap(); // before or after the logout: either
            }
            assert!(
                auth.authenticate(&metadata, "p".into()).await.is_err(),
                "round {round}: the logged-out token still passed"
            );
        }
    }
}
