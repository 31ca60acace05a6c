//! Keys from event fields, canonical: a number's key is written from its text (never through
//! a binary float, which merges `123456789012345678901234567890` with `…891`), in one form
//! whatever its spelling (`1`, `1.0`, `1e0` and `10E-1` are all `1`; `-0` is `0`), so the
//! number `1` and the string `"1"` are one key.

use serde_json::value::RawValue;

/// The canonical text of a JSON number: plain digits (`-12.5`, `100`, `0.001`), or
/// `<digits>e<exponent>` when writing it plain would take more than 40 digits (zeros
/// included) and it is not an integer written in full already.
/// `None` when `text` is not a JSON number.
pub fn canonical_number(text: &str) -> Option<String> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], parse_exponent(&rest[i + 1..])?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let json_shape = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && (int == "0" || !int.starts_with('0'))
        && !(mantissa.contains('.') && frac.is_empty());
    if !json_shape {
        return None;
    }
    // value = digits × 10^scale, in i128: no exponent a producer writes overflows it.
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    let scale = exponent - frac.len() as i128 + (digits.len() - trimmed.len()) as i128;
    let digits = trimmed;
    if digits.is_empty() {
        return Some("0".into());
    }
    let sign = if negative { "-" } else { "" };
    let len = digits.len() as i128;
    let plain = if scale >= 0 {
        (scale == 0 || len + scale <= 40)
            .then(|| format!("{sign}{digits}{}", "0".repeat(scale as usize)))
    } else if -scale < len {
        let point = (len + scale) as usize;
        Some(format!("{sign}{}.{}", &digits[..point], &digits[point..]))
    } else {
        (-scale - len < 40)
            .then(|| format!("{sign}0.{}{digits}", "0".repeat((-scale - len) as usize)))
    };
    Some(plain.unwrap_or_else(|| format!("{sign}{digits}e{scale}")))
}

/// An exponent's digits (with their sign), however long: beyond i128 it cannot matter which,
/// the value is then written with that huge exponent clamped.
fn parse_exponent(text: &str) -> Option<i128> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value = digits
        .trim_start_matches('0')
        .parse::<i128>()
        .unwrap_or(if digits.trim_start_matches('0').is_empty() {
            0
        } else {
            i128::MAX / 4
        })
        .min(i128::MAX / 4);
    Some(if negative { -value } else { value })
}

/// A key's text from the raw JSON value of a field: a non-empty string as it is, a number
/// canonical. `None` for anything else (null, booleans, objects, arrays, `""`).
pub fn key_text(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).ok()?;
        return (!s.is_empty()).then_some(s);
    }
    canonical_number(text)
}

/// A part of an aggregation's group from the raw JSON value of a field: a string as it is, a
/// number canonical, `null` nothing, anything else its JSON text.
pub fn group_part(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    match text.as_bytes().first()? {
        b'"' => serde_json::from_str(text).ok(),
        b'n' => None,
        b'-' | b'0'..=b'9' => canonical_number(text),
        _ => Some(text.to_owned()),
    }
}

/// The key of a group of several parts: a JSON array of their texts (`["c1","gold",null]`),
/// which no two groups share (values joined by a separator did).
pub fn group_key_of(parts: &[Option<String>]) -> String {
    // Strings and nulls always serialise.
    serde_json::to_string(parts).unwrap_or_default()
}

/// A key of a group of `parts` parts as a client wrote it (`[ "c1", 1.0 ]`), in the form the
/// store holds it (`["c1","1"]`); `None` when it is not a JSON array of that many values.
pub fn normalize_group_key(text: &str, parts: usize) -> Option<String> {
    let values: Vec<&RawValue> = serde_json::from_str(text).ok()?;
    if values.len() != parts {
        return None;
    }
    let parts: Vec<Option<String>> = values.into_iter().map(group_part).collect();
    Some(group_key_of(&parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_have_one_spelling() {
        for (text, canonical) in [
            ("1", "1"),
            ("1.0", "1"),
            ("-0", "0"),
            ("-0.0e5", "0"),
            ("1e0", "1"),
            ("10E-1", "1"),
            ("1.50", "1.5"),
            ("-12.5", "-12.5"),
            ("0.001", "0.001"),
            ("1e-3", "0.001"),
            ("100", "100"),
            ("1e2", "100"),
            (
                "123456789012345678901234567890",
                "123456789012345678901234567890",
            ),
            (
                "123456789012345678901234567891",
                "123456789012345678901234567891",
            ),
            ("1.2345678901234568e+29", "123456789012345680000000000000"),
            ("1e300", "1e300"),
            ("-25e-300", "-25e-300"),
            ("1e-9223372036854775808", "1e-9223372036854775808"),
            ("1e9223372036854775807", "1e9223372036854775807"),
            ("0e-99999999999999999999999999999", "0"),
            ("-0.0", "0"),
            ("5e00", "5"),
            ("1e+2", "100"),
            (
                "12345678901234567890123456789012345678901",
                "12345678901234567890123456789012345678901",
            ),
            ("1e39", "1000000000000000000000000000000000000000"),
            ("1e40", "1e40"),
        ] {
            assert_eq!(canonical_number(text).as_deref(), Some(canonical), "{text}");
        }
        for bad in ["", "-", "01", "1.", ".5", "1e", "+1", "1x", "0x10", "--1"] {
            assert_eq!(canonical_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_number_and_its_string_are_one_key() {
        let raw = |t: &str| -> Box<RawValue> { serde_json::from_str(t).unwrap() };
        assert_eq!(key_text(&raw("1.0")), key_text(&raw("\"1\"")));
        assert_eq!(key_text(&raw("\"a\\\"b\"")).as_deref(), Some("a\"b"));
        for none in ["\"\"", "null", "true", "[1]", "{}"] {
            assert_eq!(key_text(&raw(none)), None, "{none}");
        }
    }

    #[test]
    fn a_group_key_as_written_is_the_one_stored() {
        assert_eq!(
            normalize_group_key(r#"[ "c1", 1.0, null ]"#, 3).as_deref(),
            Some(r#"["c1","1",null]"#)
        );
        assert_eq!(normalize_group_key(r#"["c1"]"#, 2), None);
        assert_eq!(normalize_group_key("c1|gold", 2), None);
    }
}
