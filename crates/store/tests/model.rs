//! Model-based check: random operation sequences applied to SqliteStore and to a plain in-memory
//! model must agree on every key, revision and version, and a watch from revision 1 must replay
//! exactly the changes the model recorded.

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use aloft_store::{
        Durability, EventKind, Expect, Op, Revision, SqliteOptions, SqliteStore, Store, StoreError, Txn,
    };
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Put(u8, u8),
        Delete(u8),
        DeletePrefix(u8),
        /// Compare-and-swap with the key's current revision (`true`) or a stale one.
        Cas(u8, u8, bool),
        /// Two puts in one transaction.
        PutPair(u8, u8, u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..6, any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
            (0u8..6).prop_map(Step::Delete),
            (0u8..2).prop_map(Step::DeletePrefix),
            (0u8..6, any::<u8>(), any::<bool>()).prop_map(|(k, v, c)| Step::Cas(k, v, c)),
            (0u8..6, 0u8..6, any::<u8>()).prop_map(|(a, b, v)| Step::PutPair(a, b, v)),
        ]
    }

    fn key(k: u8) -> String {
        format!("/m/{}/{k}", k % 2)
    }

    #[derive(Debug, Default)]
    struct Model {
        revision: i64,
        /// key → (value, create_revision, mod_revision, version)
        kv: BTreeMap<String, (Vec<u8>, i64, i64, i64)>,
        /// Every change: (revision, kind, key, value)
        log: Vec<(i64, EventKind, String, Vec<u8>)>,
    }

    impl Model {
        fn put(&mut self, rev: i64, k: &str, v: Vec<u8>) {
            let entry = match self.kv.get(k) {
                Some((_, create, _, version)) => (v.clone(), *create, rev, version + 1),
                None => (v.clone(), rev, rev, 1),
            };
            self.kv.insert(k.to_owned(), entry);
            self.log.push((rev, EventKind::Put, k.to_owned(), v));
        }

        fn delete(&mut self, rev: i64, k: &str) -> bool {
            let existed = self.kv.remove(k).is_some();
            if existed {
                self.log.push((rev, EventKind::Delete, k.to_owned(), Vec::new()));
            }
            existed
        }

        /// Runs `f` at the next revision; the revision advances only if it changed something.
        fn write(&mut self, f: impl FnOnce(&mut Self, i64)) {
            let before = self.log.len();
            let rev = self.revision + 1;
            f(self, rev);
            if self.log.len() > before {
                self.revision = rev;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn store_agrees_with_the_model(steps in proptest::collection::vec(step(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let s = SqliteStore::open_with(
                dir.path().join("m.db"),
                SqliteOptions { durability: Durability::Normal, reaper_interval: None, ..Default::default() },
            )
            .unwrap();
            let mut m = Model::default();
            for st in steps {
                match st {
                    Step::Put(k, v) => {
                        s.put(&key(k), vec![v]).unwrap();
                        m.write(|m, r| m.put(r, &key(k), vec![v]));
                    }
                    Step::Delete(k) => {
                        let existed = s.delete(&key(k)).unwrap();
                        let mut model_existed = false;
                        m.write(|m, r| model_existed = m.delete(r, &key(k)));
                        prop_assert_eq!(existed, model_existed);
                    }
                    Step::DeletePrefix(p) => {
                        s.txn(Txn::new().then(Op::DeletePrefix(format!("/m/{p}/")))).unwrap();
                        let keys: Vec<String> = m.kv.keys().filter(|k| k.starts_with(&format!("/m/{p}/"))).cloned().collect();
                        m.write(|m, r| for k in &keys { m.delete(r, k); });
                    }
                    Step::Cas(k, v, current) => {
                        let found = m.kv.get(&key(k)).map_or(0, |e| e.2);
                        let expect = if current {
                            if found == 0 { Expect::Absent } else { Expect::Revision(Revision(found)) }
                        } else {
                            Expect::Revision(Revision(found + 1000))
                        };
                        match s.put_if(&key(k), vec![v], expect, None) {
                            Ok(r) => {
                                prop_assert!(current);
                                m.write(|m, rev| m.put(rev, &key(k), vec![v]));
                                prop_assert_eq!(r, Revision(m.revision));
                            }
                            Err(StoreError::Conflict { found: f, .. }) => {
                                prop_assert!(!current);
                                prop_assert_eq!(f, Revision(found));
                            }
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                    Step::PutPair(a, b, v) => {
                        s.txn(Txn::new().then(Op::put(key(a), vec![v])).then(Op::put(key(b), vec![v, v]))).unwrap();
                        m.write(|m, r| { m.put(r, &key(a), vec![v]); m.put(r, &key(b), vec![v, v]); });
                    }
                }
                prop_assert_eq!(s.revision().unwrap(), Revision(m.revision));
            }
            // Every key agrees.
            let all = s.range("/m/", &Default::default()).unwrap();
            let got: BTreeMap<String, (Vec<u8>, i64, i64, i64)> = all
                .kvs
                .into_iter()
                .map(|kv| (kv.key, (kv.value, kv.create_revision.0, kv.mod_revision.0, kv.version)))
                .collect();
            prop_assert_eq!(&got, &m.kv);
            // The change log replays exactly.
            let mut w = s.watch("/m/", Some(Revision(1))).unwrap();
            let mut replay = Vec::new();
            while let Some(b) = w.try_recv().unwrap() {
                for e in b.events {
                    prop_assert_eq!(e.kv.mod_revision, b.revision);
                    replay.push((b.revision.0, e.kind, e.kv.key, e.kv.value));
                }
            }
            prop_assert_eq!(replay, m.log);
        }
    }
}
