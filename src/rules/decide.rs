//! The per-request decision: may this visitor reach this tunnel? Pure but for the rate bucket,
//! which takes the clock from the caller.
//!
//! Order: the client address (`allow`, cheapest and says nothing), the rate (so credential
//! guessing is rate-limited too), the private token (a link being redeemed, a cookie, a bearer),
//! then basic auth.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use data_encoding::BASE64;

use super::token::{LinkKey, COOKIE, QUERY};
use super::{Bucket, Rules};

/// What the decision looks at, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub struct Visit<'a> {
    /// The tunnel host the request was routed by.
    pub host: &'a str,
    /// The client after PROXY.
    pub client: IpAddr,
    pub authorization: Option<&'a [u8]>,
    pub cookie: Option<&'a [u8]>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub now: Instant,
    /// Seconds since the epoch, for token expiry.
    pub unix_now: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// A valid link: set the cookie and send the visitor to `location`, the same URL without
    /// the token.
    Redeem {
        location: String,
        set_cookie: String,
    },
    Deny(Refusal),
}

/// Why a visitor was turned away; `reason()` is the metric label.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not in the tunnel's `allow` list: 403.
    Address,
    /// Over the tunnel's `rate`: 429 with `Retry-After`.
    Rate { retry_after: Duration },
    /// A `private` tunnel without a valid token: 401.
    Private { why: &'static str },
    /// Basic auth missing or wrong: 401 with a realm naming the host.
    Auth,
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Address => "allow",
            Self::Rate { .. } => "rate",
            Self::Private { .. } => "private",
            Self::Auth => "auth",
        }
    }
}

/// Decides `visit` against `rules` (with the tunnel's `bucket` when it has a rate).
pub fn decide(visit: &Visit<'_>, rules: &Rules, bucket: Option<&Bucket>, key: &LinkKey) -> Decision {
    if !rules.allows(visit.client) {
        return Decision::Deny(Refusal::Address);
    }
    if let Some(bucket) = bucket {
        if let Err(retry_after) = bucket.take(visit.now) {
            return Decision::Deny(Refusal::Rate { retry_after });
        }
    }
    if rules.private {
        if let Some(token) = visit.query.and_then(|q| query_token(q)) {
            return match key.check(visit.host, token, visit.unix_now) {
                Ok(()) => redeem(visit, token),
                Err(e) => Decision::Deny(Refusal::Private { why: why(&e) }),
            };
        }
        // Any one valid token will do: a sibling host may plant a cookie of the same name (a
        // parent-domain cookie), which must not lock the visitor out. At most a few are checked.
        let presented = visit
            .cookie
            .map(cookie_tokens)
            .into_iter()
            .flatten()
            .chain(visit.authorization.and_then(bearer))
            .take(MAX_TOKENS_TRIED);
        let mut first_error = None;
        let mut valid = false;
        for token in presented {
            match key.check(visit.host, token, visit.unix_now) {
                Ok(()) => {
                    valid = true;
                    break;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if !valid {
            let why = first_error.as_ref().map_or("no token", why);
            return Decision::Deny(Refusal::Private { why });
        }
    }
    if let Some(auth) = &rules.auth {
        let ok = visit
            .authorization
            .and_then(basic)
            .is_some_and(|(user, password)| auth.verify(&user, &password));
        if !ok {
            return Decision::Deny(Refusal::Auth);
        }
    }
    Decision::Allow
}

fn why(e: &super::token::TokenError) -> &'static str {
    match e {
        super::token::TokenError::Malformed => "malformed token",
        super::token::TokenError::Expired => "expired token",
        super::token::TokenError::Forged => "token not valid for this host",
    }
}

/// `edgemux_link=TOKEN` among the query's pairs.
fn query_token(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(QUERY)?.strip_prefix('='))
}

fn redeem(visit: &Visit<'_>, token: &str) -> Decision {
    let rest: Vec<&str> = visit
        .query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.strip_prefix(QUERY).is_none_or(|r| !r.starts_with('=')))
        .collect();
    // One leading slash: `//host/x` would send the browser to another site.
    let mut location = format!("/{}", visit.path.trim_start_matches(['/', '\\']));
    if !rest.is_empty() {
        location.push('?');
        location.push_str(&rest.join("&"));
    }
    let max_age = token
        .split_once('.')
        .and_then(|(e, _)| e.parse::<u64>().ok())
        .map_or(0, |e| e.saturating_sub(visit.unix_now));
    // No Domain attribute: the cookie stays with this host alone.
    let set_cookie = format!("{COOKIE}={token}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax");
    Decision::Redeem { location, set_cookie }
}

/// Most link tokens (cookies and a bearer) one request may have checked.
const MAX_TOKENS_TRIED: usize = 4;

/// Our cookie's values in a `Cookie` header.
fn cookie_tokens(header: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(header)
        .unwrap_or_default()
        .split(';')
        .filter_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == COOKIE).then_some(value)
        })
}

fn bearer(header: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, token) = text.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// `Authorization: Basic base64(user:password)`, bounded before decoding.
fn basic(header: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || encoded.len() > 512 {
        return None;
    }
    let decoded = BASE64.decode(encoded.trim().as_bytes()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests;
