//! Human-readable sizes in the two shapes QEMU's tools print, so that our
//! output lines up with theirs: `size_to_str` (qemu-img info: "1 MiB",
//! "0.999 GiB", "193 KiB") and `cvtstr` (qemu-io: "64 KiB", "1.500 KiB",
//! "16 bytes").

const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/// C's `frexp` exponent for a positive finite value: the `e` with
/// `value = m * 2^e`, `m` in [0.5, 1).
fn frexp_exponent(value: f64) -> i32 {
    if value <= 0.0 || !value.is_finite() {
        return 0;
    }
    let (m, e) = if value < f64::MIN_POSITIVE {
        // Subnormal: scale into the normal range first (cannot happen for
        // the byte counts we print, handled for completeness).
        (value * 2f64.powi(64), -64)
    } else {
        (value, 0)
    };
    let biased = ((m.to_bits() >> 52) & 0x7ff) as i32;
    biased - 1022 + e
}

/// C's `%.3g` for the values `size_to_str` produces (0 to about 1000):
/// three significant digits, trailing zeros and point dropped, exponent
/// form once rounding reaches 1000.
fn three_significant(value: f64) -> String {
    const PRECISION: i32 = 3;
    if value <= 0.0 || !value.is_finite() {
        return "0".to_string();
    }
    // %g picks the exponent of the value as rounded to the precision.
    let mut exponent = value.log10().floor() as i32;
    let decimals = |e: i32| (PRECISION - 1 - e).max(0) as usize;
    let rounded: f64 = format!("{value:.*}", decimals(exponent))
        .parse()
        .unwrap_or(value);
    if rounded >= 10f64.powi(exponent + 1) {
        exponent += 1;
    }
    if exponent >= PRECISION {
        let mantissa = value / 10f64.powi(exponent);
        return format!("{}e+{exponent:02}", trim_zeros(format!("{mantissa:.2}")));
    }
    trim_zeros(format!("{value:.*}", decimals(exponent)))
}

fn trim_zeros(mut s: String) -> String {
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    s
}

/// QEMU's `size_to_str`: the unit switches up when the value reaches 1000
/// of the current one, so sizes show at most three integer digits.
#[must_use]
pub fn size_to_str(bytes: u64) -> String {
    let i = frexp_exponent(bytes as f64 / (1000.0 / 1024.0));
    // Integer division truncating toward zero, as in C.
    let index = ((i - 1) / 10).clamp(0, SUFFIXES.len() as i32 - 1) as usize;
    let div = (1u64 << (index * 10)) as f64;
    format!(
        "{} {}B",
        three_significant(bytes as f64 / div),
        SUFFIXES[index]
    )
}

/// qemu-io's `cvtstr`: three decimals, ".000" dropped, binary units.
#[must_use]
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        ((1u64 << 60) as f64, " EiB"),
        ((1u64 << 50) as f64, " PiB"),
        ((1u64 << 40) as f64, " TiB"),
        ((1u64 << 30) as f64, " GiB"),
        ((1u64 << 20) as f64, " MiB"),
        ((1u64 << 10) as f64, " KiB"),
    ];
    let (scaled, suffix) = UNITS
        .iter()
        .find(|(unit, _)| value >= *unit)
        .map(|(unit, suffix)| (value / unit, *suffix))
        .unwrap_or((value, " bytes"));
    let s = format!("{scaled:.3}");
    match s.strip_suffix(".000") {
        Some(whole) => format!("{whole}{suffix}"),
        None => format!("{s}{suffix}"),
    }
}

/// qemu-io's timing line after a request: `64 KiB, 1 ops; 00.00 sec
/// (4.914 MiB/sec and 78.6175 ops/sec)`.
#[must_use]
pub fn timing_line(bytes: u64, ops: u64, seconds: f64) -> String {
    // A zero duration would print infinite rates; QEMU's tdiv guards the
    // same way.
    let per_sec = |v: f64| if seconds > 0.0 { v / seconds } else { 0.0 };
    format!(
        "{}, {} ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
        cvtstr(bytes as f64),
        ops,
        seconds,
        cvtstr(per_sec(bytes as f64)),
        per_sec(ops as f64)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_to_str_matches_qemu_img_info() {
        // Values observed in `qemu-img info` output (QEMU 10.0.2).
        assert_eq!(size_to_str(1 << 20), "1 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(86016), "84 KiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1072693248), "0.999 GiB");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1536 << 20), "1.5 GiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
        assert_eq!(three_significant(9.996), "10");
        assert_eq!(three_significant(999.6), "1e+03");
        assert_eq!(three_significant(0.0123), "0.0123");
    }

    #[test]
    fn cvtstr_matches_qemu_io() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(16.0), "16 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(2.0 * 1024.0 * 1024.0), "2 MiB");
    }

    #[test]
    fn timing_line_shape() {
        assert_eq!(
            timing_line(65536, 1, 0.5),
            "64 KiB, 1 ops; 00.50 sec (128 KiB/sec and 2.0000 ops/sec)"
        );
        assert_eq!(
            timing_line(4096, 1, 0.0),
            "4 KiB, 1 ops; 00.00 sec (0 bytes/sec and 0.0000 ops/sec)"
        );
    }
}
