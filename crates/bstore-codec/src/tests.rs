//! Property-style tests over generated inputs: a small deterministic
//! generator keeps them repeatable without a property-testing dependency.

use bstore_domain::{Change, Event, KeyChanges, KeyId, KeyType, SessionKey};
use bytes::Bytes;

use super::*;

/// xorshift64*: deterministic, good enough to vary sizes and contents.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.next() as usize) % (max + 1);
        // Half the cases compressible (repeating), half random.
        if self.next().is_multiple_of(2) {
            (0..len).map(|i| (i % 7) as u8).collect()
        } else {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }
}

fn ring(ids: &[u32]) -> Keyring {
    Keyring::new(ids.iter().map(|&i| (i, [i as u8; KEY_LEN])), None).unwrap()
}

fn sk(t: &str, s: &str) -> SessionKey {
    SessionKey::parse(t, s).unwrap()
}

#[test]
fn values_round_trip_for_many_sizes() {
    let codec = Codec::new(ring(&[1]));
    let s = sk("t", "s");
    let ty = KeyType::parse("session").unwrap();
    let id = KeyId::parse("user.0").unwrap();
    let mut g = Gen(42);
    for _ in 0..300 {
        let v = g.bytes(5000);
        let blob = codec.seal_value(&s, Some((&ty, &id)), &v);
        assert_eq!(codec.open_value(&s, Some((&ty, &id)), &blob).unwrap(), v);
    }
}

#[test]
fn compressible_values_shrink() {
    let codec = Codec::new(ring(&[1]));
    let v = vec![b'a'; 10_000];
    assert!(codec.seal_value(&sk("t", "s"), None, &v).len() < 1000);
}

#[test]
fn events_round_trip() {
    let codec = Codec::new(ring(&[1]));
    let s = sk("acme", "bot-1");
    let mut keys = KeyChanges::new();
    keys.entry(KeyType::parse("pre-key").unwrap()).or_default().insert(KeyId::parse("1").unwrap(), Some(Bytes::from_static(b"\x00\x01")));
    keys.entry(KeyType::parse("pre-key").unwrap()).or_default().insert(KeyId::parse("2").unwrap(), None);
    let ev = Event { v: 1, at_ms: 7, rid: Some("r".into()), prev: None, change: Change::KeysChanged { keys, patched: Default::default() } };
    let blob = codec.encode_event(&s, &ev);
    assert_eq!(codec.decode_event(&s, &blob).unwrap(), ev);
}

#[test]
fn every_single_bit_flip_is_detected() {
    let codec = Codec::new(ring(&[1]));
    let s = sk("t", "s");
    let blob = codec.seal_value(&s, None, b"creds creds creds");
    for i in 0..blob.len() {
        for bit in 0..8 {
            let mut bad = blob.clone();
            bad[i] ^= 1 << bit;
            let err = codec.open_value(&s, None, &bad).unwrap_err();
            // The key id bytes turn into an unknown key; everything else fails.
            assert!(
                matches!(err, CodecError::Seal(SealError::Tampered | SealError::Malformed | SealError::UnknownKey(_))),
                "byte {i} bit {bit}: {err}"
            );
        }
    }
}

#[test]
fn a_blob_of_another_place_fails_to_open() {
    let codec = Codec::new(ring(&[1]));
    let ty = KeyType::parse("session").unwrap();
    let (a, b) = (KeyId::parse("a").unwrap(), KeyId::parse("b").unwrap());
    let blob = codec.seal_value(&sk("t", "s1"), Some((&ty, &a)), b"v");
    let tampered = |r: Result<Vec<u8>, CodecError>| matches!(r, Err(CodecError::Seal(SealError::Tampered)));
    assert!(tampered(codec.open_value(&sk("t", "s2"), Some((&ty, &a)), &blob)), "other session");
    assert!(tampered(codec.open_value(&sk("t2", "s1"), Some((&ty, &a)), &blob)), "other tenant");
    assert!(tampered(codec.open_value(&sk("t", "s1"), Some((&ty, &b)), &blob)), "other id");
    assert!(tampered(codec.open_value(&sk("t", "s1"), None, &blob)), "creds slot");
    let ev = codec.encode_event(&sk("t", "s1"), &Event { v: 1, at_ms: 0, rid: None, prev: None, change: Change::SessionDeleted });
    assert!(matches!(codec.decode_event(&sk("t", "s2"), &ev), Err(CodecError::Seal(SealError::Tampered))));
}

#[test]
fn context_parts_cannot_be_shifted_into_each_other() {
    // "ab"/"c" and "a"/"bc" must derive different subkeys.
    let codec = Codec::new(ring(&[1]));
    let blob = codec.seal_value(&sk("ab", "c"), None, b"v");
    assert!(codec.open_value(&sk("a", "bc"), None, &blob).is_err());
}

#[test]
fn rotation_seals_with_the_new_key_and_opens_old_blobs() {
    let s = sk("t", "s");
    let old = Codec::new(ring(&[1]));
    let blob1 = old.seal_value(&s, None, b"old");
    let rotated = Codec::new(ring(&[1, 2]));
    assert_eq!(rotated.keyring().current(), 2);
    let blob2 = rotated.seal_value(&s, None, b"new");
    assert_eq!(u32::from_be_bytes(blob2[2..6].try_into().unwrap()), 2);
    assert_eq!(rotated.open_value(&s, None, &blob1).unwrap(), b"old");
    // A ring that dropped key 1 reports which key is missing.
    let only2 = Codec::new(ring(&[2]));
    assert!(matches!(only2.open_value(&s, None, &blob1), Err(CodecError::Seal(SealError::UnknownKey(1)))));
}

#[test]
fn a_wrong_key_under_the_same_id_is_tampering() {
    let s = sk("t", "s");
    let a = Codec::new(Keyring::new([(1, [1u8; 32])], None).unwrap());
    let b = Codec::new(Keyring::new([(1, [9u8; 32])], None).unwrap());
    let blob = a.seal_value(&s, None, b"x");
    assert!(matches!(b.open_value(&s, None, &blob), Err(CodecError::Seal(SealError::Tampered))));
}

#[test]
fn garbage_is_malformed_not_empty() {
    let codec = Codec::new(ring(&[1]));
    let s = sk("t", "s");
    let mut g = Gen(7);
    for _ in 0..200 {
        let junk = g.bytes(100);
        assert!(codec.open_value(&s, None, &junk).is_err());
        assert!(codec.decode_event(&s, &junk).is_err());
    }
}

#[test]
fn key_entries_parse_and_report_errors_without_key_material() {
    let k = Keyring::generate_key();
    let text = format!("# keys\n{}\n{} , ", Keyring::format_entry(1, &k), Keyring::format_entry(3, &[5; 32]));
    let ring = Keyring::new(Keyring::parse_entries(&text).unwrap(), None).unwrap();
    assert_eq!(ring.ids(), vec![1, 3]);
    assert_eq!(ring.current(), 3);
    let err = Keyring::parse_entries("1:c2VjcmV0").unwrap_err();
    assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
    assert!(matches!(Keyring::new([], None), Err(KeyError::Empty)));
    assert!(matches!(Keyring::new([(1, [0; 32])], Some(2)), Err(KeyError::NoCurrent(2))));
    assert!(!format!("{ring:?}").contains(&Keyring::format_entry(1, &k)[2..]));
}

#[test]
fn id_tags_are_stable_per_session_and_hide_the_id() {
    let (ty, id) = (KeyType::parse("session").unwrap(), KeyId::parse("4915112345678.0").unwrap());
    let codec = Codec::new(ring(&[1]));
    let tag = codec.id_tag(&sk("t", "a"), &ty, &id);
    assert_eq!(tag.len(), 22);
    assert!(!tag.contains("4915112345678"));
    // The same in every call, and after a new sealing key becomes current.
    assert_eq!(tag, codec.id_tag(&sk("t", "a"), &ty, &id));
    assert_eq!(tag, Codec::new(ring(&[1, 2])).id_tag(&sk("t", "a"), &ty, &id));
    // Another session, tenant, type or id: another name.
    assert_ne!(tag, codec.id_tag(&sk("t", "b"), &ty, &id));
    assert_ne!(tag, codec.id_tag(&sk("u", "a"), &ty, &id));
    assert_ne!(tag, codec.id_tag(&sk("t", "a"), &KeyType::parse("pre-key").unwrap(), &id));
    assert_ne!(tag, codec.id_tag(&sk("t", "a"), &ty, &KeyId::parse("4915112345678.1").unwrap()));
    // Another index key: another name; a pinned index key keeps names when
    // the lowest sealing key goes.
    let pinned = *ring(&[1]).index_key();
    assert_ne!(tag, Codec::new(ring(&[2])).id_tag(&sk("t", "a"), &ty, &id));
    assert_eq!(tag, Codec::new(ring(&[2]).with_index(pinned)).id_tag(&sk("t", "a"), &ty, &id));
}

#[test]
fn the_sealing_key_id_reads_from_the_header() {
    let codec = Codec::new(ring(&[1, 3]));
    let blob = codec.seal_value(&sk("t", "a"), None, b"creds");
    assert_eq!(sealed_key_id(&blob), Some(3));
    assert_eq!(sealed_key_id(b"not sealed"), None);
}

#[test]
fn a_session_with_a_data_key_seals_under_it_and_nothing_opens_once_it_is_gone() {
    let codec = Codec::new(ring(&[1]));
    let (a, b) = (sk("t", "a"), sk("t", "b"));
    let key = Codec::generate_data_key();
    let state = |generation, key: Option<[u8; 32]>| DataKeyState {
        cut: None,
        key: key.map(|k| (generation, std::sync::Arc::new(k))),
        erased: None,
        erasing: false,
    };
    codec.data_keys().set(&a, state(1, Some(key)));
    let event = Event::new(0, None, Change::CredsPut { creds: Bytes::from_static(b"creds of a") });
    let blob = codec.encode_event(&a, &event);
    assert_eq!(sealed_under(&blob), Some(SealedUnder::DataKey(1)));
    assert_eq!(sealed_key_id(&blob), None, "no ring key id in a format-2 header");
    assert_eq!(codec.decode_event(&a, &blob).unwrap(), event);
    // Projected values stay under the ring; so does a session without a data key.
    assert_eq!(sealed_under(&codec.seal_value(&a, None, b"creds of a")), Some(SealedUnder::Ring(1)));
    assert_eq!(sealed_under(&codec.encode_event(&b, &event)), Some(SealedUnder::Ring(1)));
    // Moved to another session (even one with the same data key), it fails.
    codec.data_keys().set(&b, state(1, Some(key)));
    assert!(matches!(codec.decode_event(&b, &blob), Err(CodecError::Seal(SealError::Tampered))));

    // A process that has not looked the session up is told to.
    let other = Codec::new(ring(&[1]));
    assert!(matches!(other.decode_event(&a, &blob), Err(CodecError::Seal(SealError::NoDataKey(1)))));
    // The wrapped key opens under the ring for its own session and generation only.
    let wrapped = codec.wrap_data_key(&a, 1, &key);
    assert_eq!(other.unwrap_data_key(&a, 1, &wrapped).unwrap(), key);
    assert!(other.unwrap_data_key(&a, 2, &wrapped).is_err());
    assert!(other.unwrap_data_key(&b, 1, &wrapped).is_err());
    // Erased: no key, or a newer generation: the blob is gone for good.
    codec.data_keys().set(&a, state(1, None));
    assert!(matches!(codec.decode_event(&a, &blob), Err(CodecError::Seal(SealError::DataKeyGone(1)))));
    codec.data_keys().set(&a, state(2, Some(Codec::generate_data_key())));
    assert!(matches!(codec.decode_event(&a, &blob), Err(CodecError::Seal(SealError::DataKeyGone(1)))));
    // An erasure's marker stays under the ring whatever the session has.
    let marker = codec.encode_event_under_ring(&a, &Event::new(0, None, Change::SessionDeleted));
    assert_eq!(sealed_under(&marker), Some(SealedUnder::Ring(1)));
    assert!(Codec::new(ring(&[1])).decode_event(&a, &marker).is_ok());
}
