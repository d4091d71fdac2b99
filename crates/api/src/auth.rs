//! The `Authorization` header as Fly's clients send it.

use crate::ApiError;

/// The tokens of an `Authorization` header value.
///
/// Accepts `Bearer <token>` and fly-go's `FlyV1 <token>[,<token>…]` (macaroon tokens, several
/// comma-joined); the scheme is case-insensitive, and a whole `FlyV1 …` string pasted after
/// `Bearer` is accepted too. Empty tokens are dropped. Anything else is a 401 that says which
/// forms work.
pub fn parse_authorization(value: &str) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::unauthorized("malformed Authorization header: send \"Bearer <token>\" or \"FlyV1 <token>\"")
    };
    let (scheme, rest) = value.trim().split_once(' ').ok_or_else(bad)?;
    let mut rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if let Some((inner, tokens)) = rest.split_once(' ')
            && inner.eq_ignore_ascii_case("flyv1")
        {
            rest = tokens.trim();
        }
    } else if !scheme.eq_ignore_ascii_case("flyv1") {
        return Err(bad());
    }
    let tokens: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() || tokens.iter().any(|t| t.contains(char::is_whitespace)) {
        return Err(bad());
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_flyv1_are_accepted() {
        assert_eq!(parse_authorization("Bearer abc").unwrap(), ["abc"]);
        assert_eq!(parse_authorization("bearer  abc ").unwrap(), ["abc"]);
        assert_eq!(
            parse_authorization("FlyV1 fm2_a,fm2_b, fm1r_c").unwrap(),
            ["fm2_a", "fm2_b", "fm1r_c"]
        );
        assert_eq!(
            parse_authorization("Bearer FlyV1 fm2_a,fm2_b").unwrap(),
            ["fm2_a", "fm2_b"]
        );
    }

    #[test]
    fn anything_else_is_401() {
        for bad in [
            "",
            "abc",
            "Basic dXNlcjpwYXNz",
            "Bearer ",
            "FlyV1 ,",
            "Bearer a b",
        ] {
            let e = parse_authorization(bad).unwrap_err();
            assert_eq!(e.status(), 401, "{bad:?}");
            assert!(e.message().contains("Bearer <token>"));
        }
    }
}
