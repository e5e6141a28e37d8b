//! Values shaped like what the Node client sends for real Baileys traffic.
//!
//! Sizes are from Baileys' own Signal code (docs/benchmarks.md): a `session`
//! record is a MessagePack map of base64 strings, about 3 KB after a few
//! dozen ratchet turns; a `sender-key` record is UTF-8 JSON (keys as
//! BufferJSON number arrays) that grows by ~220 B per message sent, from ~28 KB to a plateau of ~446 KB; a `pre-key`
//! is a MessagePack map of two 32-byte keys (~85 B), uploaded 812 at a time.
//! The contents are pseudo-random in the same alphabets and structure, so
//! compression does about what it does on real records.

/// A deterministic generator (xorshift), so runs write the same bytes.
pub struct Gen(u64);

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

impl Gen {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    pub fn b64(&mut self, n: usize) -> String {
        (0..n).map(|_| B64[(self.next() % 64) as usize] as char).collect()
    }
}

/// A Signal session record of about `size` bytes: a MessagePack-like map of
/// base64 strings.
pub fn session_record(seed: u64, size: usize) -> Vec<u8> {
    let mut g = Gen::new(seed);
    let mut out = Vec::with_capacity(size + 64);
    out.extend_from_slice(b"\x81\xa8_sessions\x81\xd9\x2c");
    while out.len() < size {
        out.extend_from_slice(b"\xa9chainKey\x82\xa7counter\x05\xa3key\xd9\x2c");
        out.extend_from_slice(g.b64(44).as_bytes());
    }
    out.truncate(size);
    out
}

/// A sender-key record of about `size` bytes: UTF-8 JSON as libsignal's
/// record serializes through BufferJSON, each key a
/// `{"type":"Buffer","data":[..32 numbers..]}`, one message-key entry per
/// message sent.
pub fn sender_key_record(seed: u64, size: usize) -> Vec<u8> {
    let mut g = Gen::new(seed);
    let buf = |g: &mut Gen, n: usize| {
        let nums: Vec<String> = g.bytes(n).iter().map(|b| b.to_string()).collect();
        format!(r#"{{"type":"Buffer","data":[{}]}}"#, nums.join(","))
    };
    let mut s = String::with_capacity(size + 256);
    s.push_str(&format!(r#"[{{"senderKeyId":1067317773,"senderChainKey":{{"iteration":79,"seed":{}}},"#, buf(&mut g, 32)));
    s.push_str(&format!(r#""senderSigningKey":{{"public":{},"private":{}}},"senderMessageKeys":["#, buf(&mut g, 33), buf(&mut g, 32)));
    let mut i = 0u64;
    while s.len() + 200 < size {
        s.push_str(&format!(r#"{{"iteration":{i},"seed":{}}},"#, buf(&mut g, 32)));
        i += 1;
    }
    s.push_str(r#"{"iteration":0,"seed":{"type":"Buffer","data":[]}}]}]"#);
    let mut v = s.into_bytes();
    v.resize(size, b' ');
    v
}

/// One pre-key value: `{ private: bin32, public: bin32 }` in MessagePack.
pub fn pre_key(seed: u64) -> Vec<u8> {
    let mut g = Gen::new(seed);
    let mut v = Vec::with_capacity(88);
    v.extend_from_slice(b"\x82\xa7private\xc4\x20");
    v.extend(g.bytes(32));
    v.extend_from_slice(b"\xa6public\xc4\x20");
    v.extend(g.bytes(32));
    v
}

/// `template` with a counter written near its start, so that every write
/// changes the value (the service writes no event for an unchanged value).
pub fn stamped(template: &[u8], n: u64) -> Vec<u8> {
    let mut v = template.to_vec();
    let tag = format!("{n:016x}");
    let at = 24.min(v.len().saturating_sub(16));
    let end = (at + 16).min(v.len());
    v[at..end].copy_from_slice(&tag.as_bytes()[..end - at]);
    v
}
