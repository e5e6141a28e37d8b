//! Baileys' file form of a value and the service's stored form, each into
//! the other.
//!
//! `useMultiFileAuthState` writes `JSON.stringify(value, BufferJSON.replacer)`
//! and reads `JSON.parse(text, BufferJSON.reviver)`. The Node client stores
//! the MessagePack of what that read gives back, bytes as `bin`
//! (`clients/node/src/codec.ts`). To import a file is to compute, here, the
//! bytes the Node client would have stored for the object Baileys reads
//! from it; to export a value is to compute the text Baileys would have
//! written for the object the Node client decodes from it. Both follow the
//! JavaScript rules that decide the bytes: the order of an object's
//! properties (integer-like keys first, ascending), duplicate keys (the last
//! value, at the first key's place), the reviver's two forms of a Buffer,
//! `@msgpack/msgpack`'s choice of formats, `Number#toString` and
//! `JSON.stringify`'s escaping. Whatever the two could not agree on exactly
//! (a lone surrogate, a `__proto__` key, a Buffer in a form Node would
//! decode differently) is refused with the reason, never guessed.

use base64::Engine as _;

/// A JavaScript value as JSON and MessagePack can hold it.
#[derive(Debug, Clone, PartialEq)]
pub enum Js {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Bin(Vec<u8>),
    Arr(Vec<Js>),
    /// Properties in JavaScript's order (see [`Props`]).
    Obj(Vec<(String, Js)>),
}

/// Whether `k` is an array index, which JavaScript orders before every
/// other key, ascending.
fn array_index(k: &str) -> Option<u32> {
    if k.is_empty() || (k.len() > 1 && k.starts_with('0')) || !k.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    k.parse::<u64>().ok().filter(|&n| n < u32::MAX as u64).map(|n| n as u32)
}

/// An object's properties as JavaScript keeps them.
#[derive(Default)]
struct Props(Vec<(String, Js)>, std::collections::HashMap<String, usize>);

impl Props {
    fn set(&mut self, k: String, v: Js) {
        if let Some(&at) = self.1.get(&k) {
            self.0[at].1 = v;
        } else {
            self.1.insert(k.clone(), self.0.len());
            self.0.push((k, v));
        }
    }

    fn into_ordered(self) -> Vec<(String, Js)> {
        let (mut idx, rest): (Vec<_>, Vec<_>) = self.0.into_iter().partition(|(k, _)| array_index(k).is_some());
        idx.sort_by_key(|(k, _)| array_index(k));
        idx.extend(rest);
        idx
    }
}

// ---------------------------------------------------------------- reading JSON

/// `JSON.parse(text, BufferJSON.reviver)`, then the Node client's
/// `toPlain`: the value the client would store, ready for [`to_msgpack`].
pub fn parse_file(text: &str) -> Result<Js, String> {
    let mut p = Parser { s: text.as_bytes(), i: 0, depth: 0 };
    p.ws();
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected text at byte {}", p.i));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

/// Deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 256;

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> Result<(), String> {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(format!("invalid JSON at byte {}", self.i))
        }
    }

    fn value(&mut self) -> Result<Js, String> {
        let Some(&c) = self.s.get(self.i) else { return Err("unexpected end of JSON".into()) };
        match c {
            b'n' => self.eat("null").map(|_| Js::Null),
            b't' => self.eat("true").map(|_| Js::Bool(true)),
            b'f' => self.eat("false").map(|_| Js::Bool(false)),
            b'"' => self.string().map(Js::Str),
            b'[' | b'{' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(format!("nested deeper than {MAX_DEPTH}"));
                }
                let v = if c == b'[' { self.array() } else { self.object() };
                self.depth -= 1;
                v
            }
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(format!("invalid JSON at byte {}", self.i)),
        }
    }

    fn array(&mut self) -> Result<Js, String> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.s.get(self.i) == Some(&b']') {
            self.i += 1;
            return Ok(Js::Arr(items));
        }
        loop {
            self.ws();
            items.push(self.value()?);
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Js::Arr(items));
                }
                _ => return Err(format!("invalid JSON at byte {}", self.i)),
            }
        }
    }

    fn object(&mut self) -> Result<Js, String> {
        self.i += 1;
        let mut props = Props::default();
        self.ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return revive(props.into_ordered());
        }
        loop {
            self.ws();
            if self.s.get(self.i) != Some(&b'"') {
                return Err(format!("invalid JSON at byte {}", self.i));
            }
            let k = self.string()?;
            if k == "__proto__" {
                return Err("a `__proto__` key (the Node client cannot read it back)".into());
            }
            self.ws();
            self.eat(":")?;
            self.ws();
            let v = self.value()?;
            props.set(k, v);
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return revive(props.into_ordered());
                }
                _ => return Err(format!("invalid JSON at byte {}", self.i)),
            }
        }
    }

    fn number(&mut self) -> Result<Js, String> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let s = p.i;
            while p.i < p.s.len() && p.s[p.i].is_ascii_digit() {
                p.i += 1;
            }
            p.i - s
        };
        if self.s.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.s[int_start] == b'0') {
            return Err(format!("invalid number at byte {start}"));
        }
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return Err(format!("invalid number at byte {start}"));
            }
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(format!("invalid number at byte {start}"));
            }
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
        // Correctly rounded, as JavaScript's; too large is ±Infinity.
        text.parse::<f64>().map(Js::Num).map_err(|e| format!("invalid number at byte {start}: {e}"))
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i] != b'"' && self.s[self.i] != b'\\' && self.s[self.i] >= 0x20 {
                self.i += 1;
            }
            out.push_str(std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?);
            match self.s.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let Some(&e) = self.s.get(self.i) else { return Err("unexpected end of JSON".into()) };
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let c = if (0xd800..0xdc00).contains(&hi) {
                                if !self.s[self.i..].starts_with(b"\\u") {
                                    return Err("a lone surrogate in a string".into());
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err("a lone surrogate in a string".into());
                                }
                                char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
                            } else {
                                char::from_u32(hi)
                            };
                            out.push(c.ok_or("a lone surrogate in a string")?);
                        }
                        _ => return Err(format!("invalid escape at byte {}", self.i - 1)),
                    }
                }
                _ => return Err(format!("invalid string at byte {}", self.i)),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self.s.get(self.i..self.i + 4).ok_or("unexpected end of JSON")?;
        let h = std::str::from_utf8(h).map_err(|e| e.to_string())?;
        let n = u32::from_str_radix(h, 16).map_err(|_| format!("invalid \\u escape at byte {}", self.i))?;
        self.i += 4;
        Ok(n)
    }
}

/// `parseInt(k, 10)` is a number (leading white space, a sign, a digit).
fn parses_as_int(k: &str) -> bool {
    // JavaScript's white space: Rust's but U+0085, and U+FEFF.
    let t = k.trim_start_matches(|c: char| (c.is_whitespace() && c != '\u{85}') || c == '\u{feff}');
    let t = t.strip_prefix(['+', '-']).unwrap_or(t);
    t.starts_with(|c: char| c.is_ascii_digit())
}

/// A number stored into a `Uint8Array` (ToUint8).
fn to_uint8(n: f64) -> u8 {
    if !n.is_finite() {
        return 0;
    }
    (n.trunc().rem_euclid(256.0)) as u8
}

/// The reviver and then `toPlain` on one object, its children done.
fn revive(props: Vec<(String, Js)>) -> Result<Js, String> {
    let get = |k: &str| props.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    if get("type") == Some(&Js::Str("Buffer".into())) {
        return match get("data") {
            Some(Js::Str(b64)) => decode_base64(b64).map(Js::Bin),
            // Left by the reviver; the client's `toPlain` makes it a Buffer of the numbers.
            Some(Js::Arr(items)) if items.iter().all(|v| matches!(v, Js::Num(_))) => {
                Ok(Js::Bin(items.iter().map(|v| if let Js::Num(n) = v { to_uint8(*n) } else { 0 }).collect()))
            }
            _ => Err("an object of type `Buffer` whose data is neither base64 nor a list of numbers".into()),
        };
    }
    // Older Baileys wrote a Uint8Array as {"0": n, "1": n, ...}.
    if !props.is_empty() && props.iter().all(|(k, v)| parses_as_int(k) && matches!(v, Js::Num(_))) {
        return Ok(Js::Bin(props.iter().map(|(_, v)| if let Js::Num(n) = v { to_uint8(*n) } else { 0 }).collect()));
    }
    Ok(Js::Obj(props))
}

/// Node's `Buffer.from(s, 'base64')` for the texts it reads the same way
/// as a strict decoder: standard or URL-safe alphabet, padded or not.
fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        if let Ok(v) = engine.decode(s) {
            return Ok(v);
        }
    }
    Err("a Buffer whose data is not base64".into())
}

// ---------------------------------------------------------------- MessagePack

/// `@msgpack/msgpack`'s encoding (default options), as the Node client writes.
pub fn to_msgpack(v: &Js) -> Vec<u8> {
    let mut out = Vec::new();
    encode(v, &mut out);
    out
}

fn header(out: &mut Vec<u8>, n: usize, fix: Option<(u8, usize)>, codes: [u8; 3]) {
    match fix {
        Some((base, lim)) if n < lim => out.push(base + n as u8),
        _ if n < 0x100 && codes[0] != 0 => out.extend([codes[0], n as u8]),
        _ if n < 0x10000 => {
            out.push(codes[1]);
            out.extend((n as u16).to_be_bytes());
        }
        _ => {
            out.push(codes[2]);
            out.extend((n as u32).to_be_bytes());
        }
    }
}

fn encode(v: &Js, out: &mut Vec<u8>) {
    match v {
        Js::Null => out.push(0xc0),
        Js::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Js::Num(n) => encode_number(*n, out),
        Js::Str(s) => {
            header(out, s.len(), Some((0xa0, 32)), [0xd9, 0xda, 0xdb]);
            out.extend(s.as_bytes());
        }
        Js::Bin(b) => {
            header(out, b.len(), None, [0xc4, 0xc5, 0xc6]);
            out.extend(b);
        }
        Js::Arr(items) => {
            header(out, items.len(), Some((0x90, 16)), [0, 0xdc, 0xdd]);
            for item in items {
                encode(item, out);
            }
        }
        Js::Obj(props) => {
            header(out, props.len(), Some((0x80, 16)), [0, 0xde, 0xdf]);
            for (k, v) in props {
                encode(&Js::Str(k.clone()), out);
                encode(v, out);
            }
        }
    }
}

const MAX_SAFE: f64 = 9_007_199_254_740_991.0;

fn encode_number(n: f64, out: &mut Vec<u8>) {
    if !n.is_finite() {
        // `toPlain`: JSON has no Infinity, so null.
        out.push(0xc0);
    } else if n.fract() == 0.0 && n.abs() <= MAX_SAFE {
        let i = n as i64;
        if i >= 0 {
            match i {
                0..0x80 => out.push(i as u8),
                0x80..0x100 => out.extend([0xcc, i as u8]),
                0x100..0x10000 => {
                    out.push(0xcd);
                    out.extend((i as u16).to_be_bytes());
                }
                0x10000..0x1_0000_0000 => {
                    out.push(0xce);
                    out.extend((i as u32).to_be_bytes());
                }
                _ => {
                    out.push(0xcf);
                    out.extend((i as u64).to_be_bytes());
                }
            }
        } else if i >= -0x20 {
            out.push(i as i8 as u8);
        } else if i >= -0x80 {
            out.extend([0xd0, i as i8 as u8]);
        } else if i >= -0x8000 {
            out.push(0xd1);
            out.extend((i as i16).to_be_bytes());
        } else if i >= -0x8000_0000 {
            out.push(0xd2);
            out.extend((i as i32).to_be_bytes());
        } else {
            out.push(0xd3);
            out.extend(i.to_be_bytes());
        }
    } else {
        out.push(0xcb);
        out.extend(n.to_be_bytes());
    }
}

/// What `@msgpack/msgpack`'s decoder (and the client's `toBuffers`) makes of
/// stored bytes. Refuses what the Node client never writes.
pub fn from_msgpack(bytes: &[u8]) -> Result<Js, String> {
    let mut r = Reader { s: bytes, i: 0, depth: 0 };
    let v = r.value()?;
    if r.i != bytes.len() {
        return Err(format!("{} bytes after the value", bytes.len() - r.i));
    }
    Ok(v)
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.i.checked_add(n).filter(|&e| e <= self.s.len()).ok_or("truncated MessagePack")?;
        let b = &self.s[self.i..end];
        self.i = end;
        Ok(b)
    }

    fn uint(&mut self, n: usize) -> Result<u64, String> {
        Ok(self.take(n)?.iter().fold(0u64, |a, &b| (a << 8) | b as u64))
    }

    fn value(&mut self) -> Result<Js, String> {
        let c = self.take(1)?[0];
        Ok(match c {
            0x00..=0x7f => Js::Num(c as f64),
            0x80..=0x8f => self.map((c & 0x0f) as usize)?,
            0x90..=0x9f => self.array((c & 0x0f) as usize)?,
            0xa0..=0xbf => self.str((c & 0x1f) as usize)?,
            0xc0 => Js::Null,
            0xc2 => Js::Bool(false),
            0xc3 => Js::Bool(true),
            0xc4..=0xc6 => {
                let n = self.uint(1 << (c - 0xc4))? as usize;
                Js::Bin(self.take(n)?.to_vec())
            }
            0xca => Js::Num(f32::from_be_bytes(self.take(4)?.try_into().unwrap()) as f64),
            0xcb => Js::Num(f64::from_be_bytes(self.take(8)?.try_into().unwrap())),
            0xcc..=0xcf => Js::Num(self.uint(1 << (c - 0xcc))? as f64),
            0xd0 => Js::Num(self.take(1)?[0] as i8 as f64),
            0xd1 => Js::Num(i16::from_be_bytes(self.take(2)?.try_into().unwrap()) as f64),
            0xd2 => Js::Num(i32::from_be_bytes(self.take(4)?.try_into().unwrap()) as f64),
            0xd3 => Js::Num(i64::from_be_bytes(self.take(8)?.try_into().unwrap()) as f64),
            0xd9..=0xdb => {
                let n = self.uint(1 << (c - 0xd9))? as usize;
                self.str(n)?
            }
            0xdc | 0xdd => {
                let n = self.uint(if c == 0xdc { 2 } else { 4 })? as usize;
                self.array(n)?
            }
            0xde | 0xdf => {
                let n = self.uint(if c == 0xde { 2 } else { 4 })? as usize;
                self.map(n)?
            }
            0xe0..=0xff => Js::Num(c as i8 as f64),
            _ => return Err(format!("MessagePack format 0x{c:02x} (an extension), which the Node client never writes")),
        })
    }

    fn str(&mut self, n: usize) -> Result<Js, String> {
        let b = self.take(n)?;
        Ok(Js::Str(std::str::from_utf8(b).map_err(|_| "a string that is not UTF-8")?.to_owned()))
    }

    fn nest(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH { Err(format!("nested deeper than {MAX_DEPTH}")) } else { Ok(()) }
    }

    fn array(&mut self, n: usize) -> Result<Js, String> {
        self.nest()?;
        let mut items = Vec::with_capacity(n.min(self.s.len()));
        for _ in 0..n {
            items.push(self.value()?);
        }
        self.depth -= 1;
        Ok(Js::Arr(items))
    }

    fn map(&mut self, n: usize) -> Result<Js, String> {
        self.nest()?;
        let mut props = Props::default();
        for _ in 0..n {
            let k = match self.value()? {
                Js::Str(k) if k == "__proto__" => return Err("a `__proto__` key".into()),
                Js::Str(k) => k,
                Js::Num(n) => js_number(n),
                _ => return Err("a map key that is neither a string nor a number".into()),
            };
            let v = self.value()?;
            props.set(k, v);
        }
        self.depth -= 1;
        Ok(Js::Obj(props.into_ordered()))
    }
}

// ---------------------------------------------------------------- writing JSON

/// `JSON.stringify(value, BufferJSON.replacer)`: the text Baileys writes.
pub fn to_file(v: &Js) -> String {
    let mut out = String::new();
    write_json(v, &mut out);
    out
}

fn write_json(v: &Js, out: &mut String) {
    match v {
        Js::Null => out.push_str("null"),
        Js::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Js::Num(n) => out.push_str(&if n.is_finite() { js_number(*n) } else { "null".into() }),
        Js::Str(s) => write_str(s, out),
        Js::Bin(b) => {
            out.push_str("{\"type\":\"Buffer\",\"data\":\"");
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(b));
            out.push_str("\"}");
        }
        Js::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Js::Obj(props) => {
            out.push('{');
            for (i, (k, v)) in props.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(k, out);
                out.push(':');
                write_json(v, out);
            }
            out.push('}');
        }
    }
}

fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `Number#toString()` of a finite number.
pub fn js_number(n: f64) -> String {
    if n == 0.0 {
        return "0".into();
    }
    // Shortest digits that read back as `n`, as JavaScript picks them.
    let sci = format!("{:e}", n.abs());
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let exp: i32 = exp.parse().expect("{:e}'s exponent is an integer");
    let k = digits.len() as i32;
    let point = exp + 1;
    let body = if k <= point && point <= 21 {
        format!("{digits}{}", "0".repeat((point - k) as usize))
    } else if 0 < point && point <= 21 {
        format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
    } else if -6 < point && point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else {
        let e = point - 1;
        let sign = if e < 0 { '-' } else { '+' };
        if k == 1 { format!("{digits}e{sign}{}", e.abs()) } else { format!("{}.{}e{sign}{}", &digits[..1], &digits[1..], e.abs()) }
    };
    if n < 0.0 { format!("-{body}") } else { body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_as_javascript_prints_them() {
        for (n, s) in [
            (1.0, "1"),
            (-1.5, "-1.5"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (0.000001, "0.000001"),
            (1e-7, "1e-7"),
            (123.456, "123.456"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (-0.0, "0"),
        ] {
            assert_eq!(js_number(n), s);
        }
    }

    #[test]
    fn a_file_reads_back_as_the_client_stores_it_and_prints_as_baileys_writes_it() {
        let text = r#"{"b":1,"2":{"type":"Buffer","data":"AQID"},"a":[1.5,-33,300,"x"],"1":{"0":1,"1":2},"b":true}"#;
        let v = parse_file(text).unwrap();
        // Index keys first; the duplicate `b` keeps its place with the last value.
        assert_eq!(
            to_file(&v),
            r#"{"1":{"type":"Buffer","data":"AQI="},"2":{"type":"Buffer","data":"AQID"},"b":true,"a":[1.5,-33,300,"x"]}"#
        );
        let packed = to_msgpack(&v);
        assert_eq!(from_msgpack(&packed).unwrap(), v);
        assert_eq!(packed[0], 0x84);
        assert!(parse_file("{\"a\":\"\\ud800\"}").is_err());
        assert!(parse_file("{\"a\":").is_err());
    }
}
