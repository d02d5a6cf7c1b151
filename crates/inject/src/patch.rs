//! The JSON Patch (RFC 6902) the injector answers with: `add` operations only, built by
//! `inject` and applied here to produce the mutated pod, so the patch a webhook returns and the
//! pod `latchctl inject` prints can never disagree.

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

/// One `add` operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatchOp {
    /// Always "add".
    pub op: &'static str,
    /// A JSON Pointer (RFC 6901).
    pub path: String,
    pub value: Value,
}

impl PatchOp {
    /// `add` at the pointer made of `segments` (escaped here).
    pub fn add(segments: &[&str], value: Value) -> Self {
        let path = segments.iter().fold(String::new(), |mut path, segment| {
            path.push('/');
            path.push_str(&escape(segment));
            path
        });
        Self {
            op: "add",
            path,
            value,
        }
    }
}

/// A patch that does not fit the document it is applied to.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("JSON Patch path {path}: {reason}")]
pub struct PatchError {
    pub path: String,
    pub reason: &'static str,
}

/// Escapes one JSON Pointer segment: `~` as `~0`, `/` as `~1`.
pub fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// Applies `ops` to `doc` in order, with RFC 6902 `add` semantics: an object member is
/// created or replaced; in an array, `-` appends and an index inserts before that element.
pub fn apply(doc: &mut Value, ops: &[PatchOp]) -> Result<(), PatchError> {
    for op in ops {
        let fail = |reason| PatchError {
            path: op.path.clone(),
            reason,
        };
        let Some(rest) = op.path.strip_prefix('/') else {
            return Err(fail("does not start with '/'"));
        };
        let mut segments: Vec<String> = rest.split('/').map(unescape).collect();
        let last = segments.pop().unwrap_or_default();
        let mut target = &mut *doc;
        for segment in &segments {
            target = match target {
                Value::Object(map) => map.get_mut(segment),
                Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| fail("parent does not exist"))?;
        }
        match target {
            Value::Object(map) => {
                map.insert(last, op.value.clone());
            }
            Value::Array(items) if last == "-" => items.push(op.value.clone()),
            Value::Array(items) => {
                let index = last
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= items.len())
                    .ok_or_else(|| fail("array index out of range"))?;
                items.insert(index, op.value.clone());
            }
            _ => return Err(fail("parent is neither an object nor an array")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn add_follows_rfc_6902() {
        let mut doc = json!({"a": {"list": [1, 3]}});
        let ops = [
            PatchOp::add(&["a", "list", "1"], json!(2)),
            PatchOp::add(&["a", "list", "-"], json!(4)),
            PatchOp::add(&["a", "list", "0"], json!(0)),
            PatchOp::add(&["a", "x/y~z"], json!("escaped")),
            PatchOp::add(&["a", "x/y~z"], json!("replaced")),
        ];
        assert_eq!(ops[3].path, "/a/x~1y~0z");
        apply(&mut doc, &ops).unwrap();
        assert_eq!(
            doc,
            json!({"a": {"list": [0, 1, 2, 3, 4], "x/y~z": "replaced"}})
        );
    }

    #[test]
    fn patches_that_do_not_fit_are_refused() {
        for (path, reason) in [
            (&["missing", "x"][..], "parent does not exist"),
            (&["list", "5"][..], "array index out of range"),
            (&["list", "x"][..], "array index out of range"),
            (
                &["scalar", "x"][..],
                "parent is neither an object nor an array",
            ),
        ] {
            let mut doc = json!({"list": [1], "scalar": 1});
            let err = apply(&mut doc, &[PatchOp::add(path, json!(0))]).unwrap_err();
            assert_eq!(err.reason, reason, "{path:?}");
        }
    }
}
