//! The round trip every JSON protocol message must survive: what a decoder accepted, encoded again and
//! decoded again, is the same message.
//!
//! Numbers are compared exactly, except floating-point ones, which may move by a few units in the last
//! place: `serde_json` parses floats fast rather than correctly rounded (its `float_roundtrip` feature is
//! off), and a seconds figure one ULP off is not a bug worth failing on. Everything else must be equal.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Encodes `value`, decodes the encoding, and panics unless the result is the same message.
pub fn assert_round_trip<T: Serialize + DeserializeOwned>(value: &T, what: &str) {
    let text = serde_json::to_vec(value).unwrap_or_else(|e| panic!("{what}: a decoded message does not encode: {e}"));
    let again: T = serde_json::from_slice(&text)
        .unwrap_or_else(|e| panic!("{what}: its own encoding {} does not decode: {e}", String::from_utf8_lossy(&text)));
    let (before, after) = (to_value(value, what), to_value(&again, what));
    assert!(
        equivalent(&before, &after),
        "{what}: the round trip changed the message\nbefore: {before}\nafter:  {after}"
    );
}

fn to_value<T: Serialize>(value: &T, what: &str) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| panic!("{what}: a decoded message is not JSON: {e}"))
}

/// Equal, with floats allowed a few ULPs apart.
pub fn equivalent(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
                (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| equivalent(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| equivalent(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn floats_may_move_a_little_and_nothing_else_may() {
        assert!(equivalent(&json!({"a": [1, 2.5]}), &json!({"a": [1, 2.5]})));
        assert!(equivalent(&json!(0.1), &json!(0.1 + f64::EPSILON / 8.0)));
        assert!(!equivalent(&json!(0.1), &json!(0.2)));
        assert!(!equivalent(&json!(1), &json!(2)));
        assert!(!equivalent(&json!({"a": 1}), &json!({"b": 1})));
        assert!(!equivalent(&json!([1]), &json!([1, 1])));
        assert!(!equivalent(&json!("x"), &json!("y")));
    }
}
