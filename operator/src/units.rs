//! Parsing of the human units the spec uses (`30s`, `1h30m`, `50Gi`) into the whole numbers the
//! agents take. The CRD schema already restricts both to these forms; parsing again here keeps
//! the operator safe against objects stored before a schema change, with errors naming the field.

use crate::{Error, Result};

/// Milliseconds in `value`, a sequence of `<integer><unit>` groups with units `ms`, `s`, `m`,
/// `h` (e.g. `1h30m`, `500ms`).
pub fn duration_ms(field: &str, value: &str) -> Result<u64> {
    let invalid = |reason: &str| Error::InvalidSpec {
        field: field.to_owned(),
        reason: format!("{value:?} is not a duration ({reason}); use e.g. 30s, 1h30m, 500ms"),
    };
    if value.is_empty() {
        return Err(invalid("empty"));
    }
    let mut total: u64 = 0;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid("expected a number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| invalid("number too large"))?;
        rest = &rest[digits..];
        let (unit_ms, unit_len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return Err(invalid("expected a unit ms, s, m or h"));
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(unit_ms)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| invalid("too long"))?;
    }
    Ok(total)
}

/// Bytes in `value`, an integer with an optional Kubernetes suffix (`Ki`..`Ei` binary,
/// `k`..`E` decimal), e.g. `50Gi`.
pub fn bytes(field: &str, value: &str) -> Result<u64> {
    let invalid = |reason: &str| Error::InvalidSpec {
        field: field.to_owned(),
        reason: format!("{value:?} is not a byte quantity ({reason}); use e.g. 10Gi, 500M"),
    };
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(invalid("expected a number"));
    }
    let number: u64 = value[..digits]
        .parse()
        .map_err(|_| invalid("number too large"))?;
    let multiplier: u64 = match &value[digits..] {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        _ => return Err(invalid("unknown suffix")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| invalid("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_add_up_their_groups() {
        assert_eq!(duration_ms("f", "30s").unwrap(), 30_000);
        assert_eq!(duration_ms("f", "1h30m").unwrap(), 5_400_000);
        assert_eq!(duration_ms("f", "500ms").unwrap(), 500);
        assert_eq!(duration_ms("f", "1m1s1ms").unwrap(), 61_001);
    }

    #[test]
    fn bad_durations_name_the_field_and_the_value() {
        for bad in ["", "30", "s", "30x", "1.5s", "99999999999999999999s"] {
            let err = duration_ms("spec.queues[0].ackTimeout", bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("spec.queues[0].ackTimeout"), "{err}");
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn byte_quantities_use_binary_and_decimal_suffixes() {
        assert_eq!(bytes("f", "10Gi").unwrap(), 10 << 30);
        assert_eq!(bytes("f", "500M").unwrap(), 500_000_000);
        assert_eq!(bytes("f", "42").unwrap(), 42);
    }

    #[test]
    fn bad_byte_quantities_are_refused() {
        for bad in ["", "Gi", "10Gb", "1.5Gi", "99999999Ei"] {
            let err = bytes("spec.queues[0].maxBacklog.bytes", bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("maxBacklog.bytes"), "{err}");
        }
    }
}
