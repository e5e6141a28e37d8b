//! How a key document names its key without naming the contact.
//!
//! Key ids are JIDs, phone numbers, LIDs and group ids: in clear, a copy of
//! the `keys` collection would tell who talks to whom. So a key document is
//! named by the key's id tag ([`Codec::id_tag`]: a keyed hash under the
//! ring's index key, per session, stable across sealing-key rotations) and
//! the id itself is sealed together with the value:
//!
//! ```text
//! _id   = "<tenant>.<session>\x1f<type>\x1f<tag>"     tag = id_tag(session, type, id)
//! value = seal(session, slot (type, tag), len(id) u16 BE ‖ id ‖ value)
//! ```
//!
//! The blob is bound to its slot (its session, type and tag), and the id
//! found inside must hash to the tag: a value moved to another document, or
//! an id swapped for another, does not open.

use bstore_codec::Codec;
use bstore_domain::{KeyId, KeyType, SessionKey};

use crate::store::{ID_SEP, sid};

/// The `_id` of the document of key `id` of type `ty` of `session`.
pub fn key_doc_id(codec: &Codec, session: &SessionKey, ty: &KeyType, id: &KeyId) -> String {
    doc_id_of_tag(session, ty, &codec.id_tag(session, ty, id))
}

/// The `_id` of a key document, from its tag.
pub(crate) fn doc_id_of_tag(session: &SessionKey, ty: &KeyType, tag: &str) -> String {
    format!("{}{ID_SEP}{ty}{ID_SEP}{tag}", sid(session))
}

/// Seals key `id` and its value for the document named by `tag`.
pub(crate) fn seal_key(codec: &Codec, session: &SessionKey, ty: &KeyType, tag: &str, id: &KeyId, value: &[u8]) -> Vec<u8> {
    let id = id.as_str().as_bytes();
    let mut plain = Vec::with_capacity(2 + id.len() + value.len());
    // A key id is at most 512 bytes (`KeyId::parse`).
    plain.extend_from_slice(&(id.len() as u16).to_be_bytes());
    plain.extend_from_slice(id);
    plain.extend_from_slice(value);
    codec.seal_value(session, Some((ty, &slot(tag))), &plain)
}

/// Opens what [`seal_key`] sealed for the document named by `tag`: the key
/// id and its value. The error says why, naming no id and no value.
pub(crate) fn open_key(codec: &Codec, session: &SessionKey, ty: &KeyType, tag: &str, blob: &[u8]) -> Result<(KeyId, Vec<u8>), String> {
    let plain = codec.open_value(session, Some((ty, &slot(tag))), blob).map_err(|e| e.to_string())?;
    let malformed = || "the sealed key does not decode".to_string();
    let (len, rest) = plain.split_first_chunk::<2>().ok_or_else(malformed)?;
    let len = u16::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(malformed());
    }
    let (id, value) = rest.split_at(len);
    let id = std::str::from_utf8(id).ok().and_then(|s| KeyId::parse(s).ok()).ok_or_else(malformed)?;
    if codec.id_tag(session, ty, &id) != tag {
        return Err("the sealed key id does not match its document".into());
    }
    Ok((id, value.to_vec()))
}

/// The tag as the slot a value is sealed for. A tag is 22 characters of
/// base64url, always a valid key id.
fn slot(tag: &str) -> KeyId {
    KeyId::parse(tag).expect("an id tag is a valid key id")
}

#[cfg(test)]
mod tests {
    use bstore_codec::Keyring;

    use super::*;

    fn codec() -> Codec {
        Codec::new(Keyring::new(vec![(1, [7u8; 32])], None).unwrap())
    }

    #[test]
    fn a_sealed_key_opens_in_its_document_only() {
        let codec = codec();
        let (s, other) = (SessionKey::parse("t", "a").unwrap(), SessionKey::parse("t", "b").unwrap());
        let ty = KeyType::parse("session").unwrap();
        let (id, id2) = (KeyId::parse("4915112345678.0").unwrap(), KeyId::parse("4915112345679.0").unwrap());
        let tag = codec.id_tag(&s, &ty, &id);
        let blob = seal_key(&codec, &s, &ty, &tag, &id, b"value");
        assert_eq!(open_key(&codec, &s, &ty, &tag, &blob), Ok((id.clone(), b"value".to_vec())));

        // Another document, another session, another type: it does not open.
        let tag2 = codec.id_tag(&s, &ty, &id2);
        assert!(open_key(&codec, &s, &ty, &tag2, &blob).is_err());
        assert!(open_key(&codec, &other, &ty, &tag, &blob).is_err());
        assert!(open_key(&codec, &s, &KeyType::parse("pre-key").unwrap(), &tag, &blob).is_err());
        // An authentic blob for the slot that holds another id is refused.
        let swapped = seal_key(&codec, &s, &ty, &tag, &id2, b"value");
        assert_eq!(open_key(&codec, &s, &ty, &tag, &swapped), Err("the sealed key id does not match its document".into()));

        let doc_id = key_doc_id(&codec, &s, &ty, &id);
        assert_eq!(doc_id, format!("t.a\u{1f}session\u{1f}{tag}"));
        assert!(!doc_id.contains("4915112345678"));
    }
}
