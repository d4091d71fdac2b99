//! `/etc/passwd` and `/etc/group` parsing and user-spec resolution (no NSS: the binary is static).
//! Pure: callers pass the files' contents.

/// One `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PasswdEntry {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: String,
}

/// One `/etc/group` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupEntry {
    pub(crate) name: String,
    pub(crate) gid: u32,
    pub(crate) members: Vec<String>,
}

/// Parses `/etc/passwd`; malformed lines and comments are skipped.
pub(crate) fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

/// Parses `/etc/group`; malformed lines and comments are skipped.
pub(crate) fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// Who the workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedUser {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Supplementary groups (primary gid first).
    pub(crate) groups: Vec<u32>,
    /// Home directory from passwd, when the user has an entry.
    pub(crate) home: Option<String>,
}

/// Resolves a user spec (`name`, `uid`, `name:group`, `uid:gid`, `uid:groupname`; empty = root) as
/// Docker does: a numeric uid without a passwd entry is allowed and gets gid 0.
pub(crate) fn resolve_user(
    spec: &str,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<ResolvedUser, String> {
    let spec = spec.trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|p| p.uid == uid),
        Err(_) => Some(
            passwd
                .iter()
                .find(|p| p.name == user_part)
                .ok_or_else(|| format!("unknown user: {user_part} (not in /etc/passwd)"))?,
        ),
    };
    let uid = match entry {
        Some(e) => e.uid,
        None => user_part.parse::<u32>().unwrap_or(0),
    };
    let mut gid = entry.map_or(0, |e| e.gid);
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| format!("unknown group: {g} (not in /etc/group)"))?
                    .gid
            }
        };
    }
    let mut sup = vec![gid];
    if let Some(e) = entry {
        for g in groups {
            if g.members.contains(&e.name) && !sup.contains(&g.gid) {
                sup.push(g.gid);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        groups: sup,
        home: entry.map(|e| e.home.clone()).filter(|h| !h.is_empty()),
    })
}

/// The user name for `uid`, or the number when it has no passwd entry (for `ps`).
pub(crate) fn user_name(uid: u32, passwd: &[PasswdEntry]) -> String {
    passwd
        .iter()
        .find(|p| p.uid == uid)
        .map_or_else(|| uid.to_string(), |p| p.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        garbage line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
        app:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:root,app\nnogroup:x:65534:\napp:x:1000:\ndocker:x:999:app\n";

    fn resolve(spec: &str) -> Result<ResolvedUser, String> {
        resolve_user(spec, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn parses_passwd_and_group_skipping_junk() {
        let p = parse_passwd(PASSWD);
        assert_eq!(p.len(), 3);
        assert_eq!(p[2].home, "/home/app");
        let g = parse_group(GROUP);
        assert_eq!(g[1].members, vec!["root", "app"]);
        assert!(g[0].members.is_empty());
    }

    #[test]
    fn empty_spec_is_root() {
        let u = resolve("").unwrap();
        assert_eq!((u.uid, u.gid), (0, 0));
        assert_eq!(u.groups, vec![0, 10]);
        assert_eq!(u.home.as_deref(), Some("/root"));
    }

    #[test]
    fn name_gets_primary_and_supplementary_groups() {
        let u = resolve("app").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![1000, 10, 999]);
    }

    #[test]
    fn numeric_forms() {
        let u = resolve("1000").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        let u = resolve("1234").unwrap();
        assert_eq!((u.uid, u.gid, u.home), (1234, 0, None));
        let u = resolve("1234:5678").unwrap();
        assert_eq!((u.uid, u.gid), (1234, 5678));
        let u = resolve("65534:app").unwrap();
        assert_eq!((u.uid, u.gid), (65534, 1000));
    }

    #[test]
    fn name_and_group() {
        let u = resolve("app:wheel").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 10));
        assert_eq!(u.groups, vec![10, 999]);
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            resolve("ghost").unwrap_err(),
            "unknown user: ghost (not in /etc/passwd)"
        );
        assert_eq!(
            resolve("app:ghosts").unwrap_err(),
            "unknown group: ghosts (not in /etc/group)"
        );
    }

    #[test]
    fn user_name_falls_back_to_number() {
        let p = parse_passwd(PASSWD);
        assert_eq!(user_name(65534, &p), "nobody");
        assert_eq!(user_name(42, &p), "42");
    }
}
