//! The store's reads and transactions as etcd requests, and etcd's answers as the store's
//! results.
//!
//! Ranges: a prefix is etcd's `[key, range_end)` with `range_end` the prefix's end; the paging
//! cursor `after` narrows that interval (ascending: from `after` + NUL; descending: up to
//! `after`), so a page is one request. Transactions map one to one, with one exception: etcd
//! fails every `VALUE` comparison on an absent key, where the store's model compares an absent
//! key's value as empty. Such a comparison (only when the empty value would satisfy it) becomes
//! a nested transaction that first asks whether the key exists — still one atomic request.

use aloft_store::{
    CmpOp, Compare, KeyValue, LeaseId, Op, OpResult, Range, RangeOptions, Revision, StoreError, Target, Txn,
    TxnResponse, prefix_end,
};
use serde_json::{Value, json};

use crate::wire::{self, Kv, RangeResponse, ResponseOp, b64};

/// The key interval of a prefix: `key`, and `range_end` (`\0`: every key from `key` on).
pub(crate) fn prefix_interval(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let start = prefix.as_bytes().to_vec();
    let end = prefix_end(&start).unwrap_or_else(|| vec![0]);
    (start, end)
}

/// `/v3/kv/range`'s request for `prefix` with `options`; `None` when the range is empty anyway
/// (a cursor past its end), which etcd cannot be asked (an empty `range_end` means one key).
pub(crate) fn range_request(prefix: &str, options: &RangeOptions) -> Option<Value> {
    let (mut start, mut end) = prefix_interval(prefix);
    if let Some(after) = &options.after {
        let after = after.as_bytes();
        if options.descending {
            if end == [0] || after < end.as_slice() {
                end = after.to_vec();
            }
        } else {
            let mut next = after.to_vec();
            next.push(0);
            start = start.max(next);
        }
    }
    if end != [0] && end <= start {
        return None;
    }
    let mut req = json!({"key": b64(&start), "range_end": b64(&end)});
    if let Some(limit) = options.limit {
        // etcd's 0 means "no limit"; one key is enough to know whether there are more.
        req["limit"] = json!(limit.max(1).to_string());
    }
    if options.descending {
        req["sort_order"] = json!("DESCEND");
        req["sort_target"] = json!("KEY");
    }
    Some(req)
}

/// A range answer as the store's [`Range`], seen at `revision`.
pub(crate) fn range_result(
    resp: RangeResponse,
    options: &RangeOptions,
    revision: Revision,
) -> Result<Range, String> {
    let mut kvs = resp
        .kvs
        .into_iter()
        .enumerate()
        .map(|(i, kv)| kv.into_key_value().map_err(|d| format!("kvs[{i}]: {d}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut more = resp.more;
    if let Some(limit) = options.limit
        && kvs.len() > limit
    {
        kvs.truncate(limit);
        more = true;
    }
    Ok(Range { kvs, more, revision })
}

/// A one-key read's answer: the key, if present.
pub(crate) fn get_result(resp: RangeResponse, key: &str) -> Result<Option<KeyValue>, String> {
    let mut kvs = resp.kvs.into_iter();
    let kv = kvs.next().map(Kv::into_key_value).transpose()?;
    if kvs.next().is_some() {
        return Err(format!("more than one key for the single key {key:?}"));
    }
    if let Some(kv) = &kv
        && kv.key != key
    {
        return Err(format!("key {:?} answered for {key:?}", kv.key));
    }
    Ok(kv)
}

/// How to read one operation's result.
#[derive(Debug)]
enum Decode {
    Get(String),
    Range(RangeOptions),
    /// A range known to be empty: not sent.
    EmptyRange,
    Put,
    Delete,
}

/// One branch of a transaction: the requests sent, and how to read each operation's result.
#[derive(Debug, Default)]
struct Branch {
    requests: Vec<Value>,
    decode: Vec<Decode>,
}

fn branch(ops: &[Op]) -> Result<Branch, StoreError> {
    let mut b = Branch::default();
    for op in ops {
        let (request, decode) = match op {
            Op::Get(key) => (
                Some(json!({"request_range": {"key": b64(key.as_bytes())}})),
                Decode::Get(key.clone()),
            ),
            Op::Range(prefix, options) => match range_request(prefix, options) {
                Some(r) => (
                    Some(json!({ "request_range": r })),
                    Decode::Range(options.clone()),
                ),
                None => (None, Decode::EmptyRange),
            },
            Op::Put { key, value, lease } => {
                let mut put = json!({"key": b64(key.as_bytes()), "value": b64(value), "prev_kv": true});
                if let Some(id) = lease {
                    // etcd reads lease 0 as "no lease"; it never grants it.
                    if id.0 == 0 {
                        return Err(StoreError::LeaseNotFound { id: *id });
                    }
                    put["lease"] = json!(id.0.to_string());
                }
                (Some(json!({ "request_put": put })), Decode::Put)
            }
            Op::Delete(key) => (
                Some(json!({"request_delete_range": {"key": b64(key.as_bytes())}})),
                Decode::Delete,
            ),
            Op::DeletePrefix(prefix) => {
                let (start, end) = prefix_interval(prefix);
                (
                    Some(json!({"request_delete_range": {"key": b64(&start), "range_end": b64(&end)}})),
                    Decode::Delete,
                )
            }
        };
        b.requests.extend(request);
        b.decode.push(decode);
    }
    Ok(b)
}

fn compare_json(c: &Compare) -> Value {
    let result = match c.op {
        CmpOp::Equal => "EQUAL",
        CmpOp::NotEqual => "NOT_EQUAL",
        CmpOp::Less => "LESS",
        CmpOp::Greater => "GREATER",
    };
    let key = b64(c.key.as_bytes());
    match &c.target {
        Target::CreateRevision(r) => {
            json!({"key": key, "result": result, "target": "CREATE", "create_revision": r.0.to_string()})
        }
        Target::ModRevision(r) => {
            json!({"key": key, "result": result, "target": "MOD", "mod_revision": r.0.to_string()})
        }
        Target::Version(v) => {
            json!({"key": key, "result": result, "target": "VERSION", "version": v.to_string()})
        }
        Target::Value(v) => json!({"key": key, "result": result, "target": "VALUE", "value": b64(v)}),
        Target::Lease(l) => json!({
            "key": key, "result": result, "target": "LEASE",
            "lease": l.map_or(0, |l| l.0).to_string(),
        }),
    }
}

/// Whether `c` compares a value so that an absent key (an empty value in the store's model)
/// satisfies it, which etcd's own comparison never does.
fn holds_when_absent(c: &Compare) -> bool {
    match (&c.target, c.op) {
        (Target::Value(v), CmpOp::Equal) => v.is_empty(),
        (Target::Value(v), CmpOp::NotEqual | CmpOp::Less) => !v.is_empty(),
        _ => false,
    }
}

/// A transaction request: `plain` comparisons go to etcd as they are; each of `split` becomes a
/// nested transaction on whether its key exists (absent: the comparison holds; present: etcd
/// compares the value).
fn nest(plain: &[Value], split: &[&Compare], success: &[Value], failure: &[Value]) -> Value {
    match split.split_first() {
        None => json!({"compare": plain, "success": success, "failure": failure}),
        Some((c, rest)) => {
            let if_absent = nest(plain, rest, success, failure);
            let mut with_c = plain.to_vec();
            with_c.push(compare_json(c));
            let if_present = nest(&with_c, rest, success, failure);
            json!({
                "compare": [compare_json(&Compare::absent(c.key.clone()))],
                "success": [{"request_txn": if_absent}],
                "failure": [{"request_txn": if_present}],
            })
        }
    }
}

/// A transaction as a `/v3/kv/txn` request, and how to read its answer.
#[derive(Debug)]
pub(crate) struct TxnRequest {
    pub(crate) body: Value,
    /// Nested transactions to descend through to the one that decided.
    depth: usize,
    success: Branch,
    failure: Branch,
    /// Leases the puts name (to tell which one etcd did not find).
    pub(crate) leases: Vec<LeaseId>,
}

impl TxnRequest {
    /// The request for `txn` (keys already checked).
    pub(crate) fn new(txn: &Txn) -> Result<Self, StoreError> {
        let success = branch(&txn.success)?;
        let failure = branch(&txn.failure)?;
        let (split, plain): (Vec<&Compare>, Vec<&Compare>) =
            txn.compare.iter().partition(|c| holds_when_absent(c));
        let plain: Vec<Value> = plain.into_iter().map(compare_json).collect();
        let body = nest(&plain, &split, &success.requests, &failure.requests);
        let mut leases: Vec<LeaseId> = txn
            .success
            .iter()
            .chain(&txn.failure)
            .filter_map(|op| match op {
                Op::Put { lease: Some(id), .. } => Some(*id),
                _ => None,
            })
            .collect();
        leases.sort_unstable();
        leases.dedup();
        Ok(Self {
            body,
            depth: split.len(),
            success,
            failure,
            leases,
        })
    }

    /// The answer as the store's [`TxnResponse`].
    pub(crate) fn response(&self, resp: wire::TxnResponse) -> Result<TxnResponse, String> {
        let revision = resp.header.revision()?;
        let mut decided = resp;
        for level in 0..self.depth {
            let mut responses = decided.responses.into_iter();
            decided = match (responses.next(), responses.next()) {
                (
                    Some(ResponseOp {
                        response_txn: Some(inner),
                        ..
                    }),
                    None,
                ) => inner,
                _ => return Err(format!("nested transaction {level}: not one response_txn")),
            };
        }
        let branch = if decided.succeeded {
            &self.success
        } else {
            &self.failure
        };
        let results = results(&branch.decode, decided.responses, revision)?;
        Ok(TxnResponse {
            succeeded: decided.succeeded,
            revision,
            results,
        })
    }
}

/// One result per operation; ranges report the revision before the transaction (the one after,
/// less one, if the branch wrote anything).
fn results(
    decode: &[Decode],
    responses: Vec<ResponseOp>,
    revision: Revision,
) -> Result<Vec<OpResult>, String> {
    let sent = decode.iter().filter(|d| !matches!(d, Decode::EmptyRange)).count();
    if responses.len() != sent {
        return Err(format!("{} results for {sent} operations", responses.len()));
    }
    let mut responses = responses.into_iter().enumerate();
    let mut out = Vec::with_capacity(decode.len());
    for d in decode {
        if matches!(d, Decode::EmptyRange) {
            out.push(OpResult::Range(Range {
                kvs: Vec::new(),
                more: false,
                revision,
            }));
            continue;
        }
        let Some((i, r)) = responses.next() else {
            return Err("fewer results than operations".to_owned());
        };
        let wrong = |want: &str| format!("responses[{i}]: not a {want}");
        out.push(match d {
            Decode::Get(key) => OpResult::Get(
                get_result(r.response_range.ok_or_else(|| wrong("response_range"))?, key)
                    .map_err(|e| format!("responses[{i}]: {e}"))?,
            ),
            Decode::Range(options) => OpResult::Range(
                range_result(
                    r.response_range.ok_or_else(|| wrong("response_range"))?,
                    options,
                    revision,
                )
                .map_err(|e| format!("responses[{i}]: {e}"))?,
            ),
            Decode::Put => OpResult::Put {
                prev: r
                    .response_put
                    .ok_or_else(|| wrong("response_put"))?
                    .prev_kv
                    .map(Kv::into_key_value)
                    .transpose()
                    .map_err(|e| format!("responses[{i}].prev_kv: {e}"))?,
            },
            Decode::Delete => {
                let deleted = r
                    .response_delete_range
                    .ok_or_else(|| wrong("response_delete_range"))?
                    .deleted;
                OpResult::Delete {
                    deleted: u64::try_from(deleted)
                        .map_err(|_| format!("responses[{i}]: deleted {deleted}"))?,
                }
            }
            Decode::EmptyRange => continue,
        });
    }
    let wrote = out
        .iter()
        .any(|r| matches!(r, OpResult::Put { .. } | OpResult::Delete { deleted: 1.. }));
    let before = if wrote { Revision(revision.0 - 1) } else { revision };
    for r in &mut out {
        if let OpResult::Range(range) = r {
            range.revision = before;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;

    fn opts(limit: Option<usize>, descending: bool, after: Option<&str>) -> RangeOptions {
        RangeOptions {
            limit,
            descending,
            after: after.map(str::to_owned),
        }
    }

    #[test]
    fn cursors_narrow_the_prefix_interval() {
        let r = range_request("/r/", &opts(Some(0), false, Some("/r/03"))).unwrap();
        assert_eq!(r["key"], b64(b"/r/03\0"));
        assert_eq!(r["range_end"], b64(b"/r0"));
        assert_eq!(r["limit"], "1");
        let r = range_request("/r/", &opts(None, true, Some("/r/03"))).unwrap();
        assert_eq!(
            (r["key"].clone(), r["range_end"].clone()),
            (json!(b64(b"/r/")), json!(b64(b"/r/03")))
        );
        assert_eq!(r["sort_order"], "DESCEND");
        assert!(range_request("/r/", &opts(None, true, Some(""))).is_none());
        assert!(range_request("/r/", &opts(None, false, Some("/s"))).is_none());
        let all = range_request("/", &RangeOptions::default()).unwrap();
        assert_eq!(all["range_end"], b64(b"0"));
    }

    #[test]
    fn value_comparisons_that_an_absent_key_passes_are_nested() {
        let txn = Txn::new()
            .when(Compare::new("/a", Target::Value(Vec::new()), CmpOp::Equal))
            .when(Compare::mod_revision("/b", Revision(3)))
            .then(Op::put("/c", "x"));
        let req = TxnRequest::new(&txn).unwrap();
        assert_eq!(req.depth, 1);
        assert_eq!(req.body["compare"][0]["target"], "CREATE");
        let if_present = &req.body["failure"][0]["request_txn"];
        assert_eq!(if_present["compare"].as_array().unwrap().len(), 2);
        let if_absent = &req.body["success"][0]["request_txn"];
        assert_eq!(if_absent["compare"].as_array().unwrap().len(), 1);
        // An answer that does not nest as asked is an error, not a panic.
        let flat: wire::TxnResponse = wire::decode(
            br#"{"header":{"revision":"5"},"succeeded":true,"responses":[{"response_put":{}}]}"#,
        )
        .unwrap();
        assert!(req.response(flat).unwrap_err().contains("nested"));
        let nested: wire::TxnResponse = wire::decode(
            br#"{"header":{"revision":"5"},"succeeded":true,"responses":[{"response_txn":{"succeeded":true,"responses":[{"response_put":{}}]}}]}"#,
        )
        .unwrap();
        let resp = req.response(nested).unwrap();
        assert_eq!((resp.succeeded, resp.revision), (true, Revision(5)));
        assert_eq!(resp.results, [OpResult::Put { prev: None }]);
    }

    #[test]
    fn answers_with_the_wrong_results_are_errors() {
        let req = TxnRequest::new(&Txn::new().then(Op::get("/a")).then(Op::delete("/b"))).unwrap();
        for (body, want) in [
            (&br#"{"header":{"revision":"5"},"succeeded":true,"responses":[{"response_range":{}}]}"#[..], "1 results for 2"),
            (br#"{"header":{"revision":"5"},"succeeded":true,"responses":[{"response_put":{}},{"response_delete_range":{}}]}"#, "not a response_range"),
            (br#"{"succeeded":true}"#, "header.revision"),
            (br#"{"header":{"revision":"5"},"succeeded":true,"responses":[{"response_range":{"kvs":[{"key":"L2I=","mod_revision":"2"}]}},{"response_delete_range":{}}]}"#, "answered for"),
        ] {
            let resp: wire::TxnResponse = wire::decode(body).unwrap();
            let err = req.response(resp).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }
}
