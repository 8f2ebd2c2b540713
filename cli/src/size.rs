//! Sizes and offsets on the command line, parsed the way QEMU's
//! `qemu_strtosz` parses them so that qemu-img and qemu-io habits carry
//! over: `65536`, `0x10000`, `64k`, `1M`, `1.5G` (binary multiples,
//! suffix case-insensitive, an optional `B` for bytes).

/// Why a size could not be parsed. Every variant quotes the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Nothing to parse.
    #[error("empty size")]
    Empty,
    /// The text does not start with a number, or has junk after it.
    #[error("'{0}' is not a size (a number with an optional k, M, G, T, P or E suffix)")]
    NotANumber(String),
    /// A letter after the number that is not a size suffix.
    #[error("'{text}': unknown size suffix '{suffix}' (use k, M, G, T, P or E)")]
    BadSuffix {
        /// The whole argument.
        text: String,
        /// The offending suffix.
        suffix: String,
    },
    /// The value does not fit in 64 bits.
    #[error("'{0}' is too large (over 2^64 - 1 bytes)")]
    TooLarge(String),
    /// A fraction without a multiplier would be a fraction of a byte.
    #[error("'{0}': a fractional size needs a suffix (k, M, G, ...)")]
    FractionalBytes(String),
}

/// Digits kept after the decimal point: more cannot change the result of
/// a 64-bit size meaningfully and would only make the float longer.
const FRACTION_DIGITS_MAX: usize = 18;

/// The multiplier for a suffix letter (`None` for an unknown one).
fn multiplier(suffix: &str) -> Option<u64> {
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Parses a size in bytes. `0x` hexadecimal takes no suffix and no
/// fraction (as in QEMU, where hex with a suffix is rejected).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let not_a_number = || SizeError::NotANumber(text.to_string());
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_a_number());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::TooLarge(text.to_string()));
    }
    let int_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (int_digits, rest) = text.split_at(int_end);
    if int_digits.is_empty() {
        return Err(not_a_number());
    }
    let (fraction_digits, suffix) = match rest.strip_prefix('.') {
        Some(after_point) => {
            let end = after_point
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after_point.len());
            if end == 0 {
                return Err(not_a_number());
            }
            after_point.split_at(end)
        }
        None => ("", rest),
    };
    let mul = multiplier(suffix).ok_or_else(|| {
        if suffix.len() == 1 && suffix.bytes().all(|b| b.is_ascii_alphabetic()) {
            SizeError::BadSuffix {
                text: text.to_string(),
                suffix: suffix.to_string(),
            }
        } else {
            not_a_number()
        }
    })?;
    let too_large = || SizeError::TooLarge(text.to_string());
    let whole: u64 = int_digits.parse().map_err(|_| too_large())?;
    let mut bytes = whole.checked_mul(mul).ok_or_else(too_large)?;
    if !fraction_digits.is_empty() {
        if mul == 1 {
            return Err(SizeError::FractionalBytes(text.to_string()));
        }
        let kept = &fraction_digits[..fraction_digits.len().min(FRACTION_DIGITS_MAX)];
        // Cannot fail: "0." followed by ASCII digits is a valid float.
        let fraction: f64 = format!("0.{kept}").parse().map_err(|_| not_a_number())?;
        // Truncated like QEMU; the product is below `mul`, so it fits.
        let extra = (fraction * mul as f64) as u64;
        bytes = bytes.checked_add(extra).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// Parses a pattern byte for `-P`: decimal, `0x` hex or `0` octal like
/// `strtol(.., 0)` in qemu-io, in 0..=255.
pub fn parse_pattern(text: &str) -> Result<u8, String> {
    let parsed = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else if text.len() > 1 && text.starts_with('0') {
        u64::from_str_radix(&text[1..], 8)
    } else {
        text.parse::<u64>()
    };
    match parsed {
        Ok(v) => u8::try_from(v).map_err(|_| format!("pattern '{text}' is over 255")),
        Err(_) => Err(format!("pattern '{text}' is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_hex_and_suffixed_sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("0x10000"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
    }

    #[test]
    fn malformed_sizes_are_named() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(
            parse_size("12Q"),
            Err(SizeError::BadSuffix {
                text: "12Q".into(),
                suffix: "Q".into()
            })
        );
        assert!(matches!(parse_size("k"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("1kk"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("1."), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("0x"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("0x10k"), Err(SizeError::NotANumber(_))));
        assert!(matches!(
            parse_size("1.5"),
            Err(SizeError::FractionalBytes(_))
        ));
        assert!(matches!(parse_size("16E"), Err(SizeError::TooLarge(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("0x1ffffffffffffffff"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(parse_size("12Q").unwrap_err().to_string().contains("12Q"));
    }

    #[test]
    fn patterns() {
        assert_eq!(parse_pattern("0xab"), Ok(0xab));
        assert_eq!(parse_pattern("171"), Ok(171));
        assert_eq!(parse_pattern("0"), Ok(0));
        assert_eq!(parse_pattern("010"), Ok(8));
        assert!(parse_pattern("256").is_err());
        assert!(parse_pattern("x").is_err());
        assert!(parse_pattern("").is_err());
    }
}
