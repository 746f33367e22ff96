//! `dataset::load_keys` on an arbitrary file, for a dataset with an `email` and a `generic`
//! identifier, joined on each alone and on both. Never panics; on success, the counts add up
//! and the keys are sorted and distinct.
//!
//! Input layout: byte 0 selects the key spec (mod 3) and the row cap; the rest is the file.
#![no_main]

use std::cell::RefCell;
use std::io::Write;

use cleanroom_node::data::dataset::{KEY_PART_SEPARATOR, KeySpec, load_keys};
use cleanroom_node::data::normalise::Normaliser;
use cleanroom_node::data::{DatasetConfig, IdentifierConfig};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static DIR: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, file)) = data.split_first() else {
        return;
    };
    DIR.with_borrow_mut(|dir| {
        let dir = dir.get_or_insert_with(|| tempfile::tempdir().expect("temp dir"));
        let path = dir.path().join("data.csv");
        let mut f = std::fs::File::create(&path).expect("create data.csv");
        f.write_all(file).expect("write data.csv");
        drop(f);

        let dataset = DatasetConfig::new(
            "customers",
            path,
            vec![
                IdentifierConfig::new("email", "email", Normaliser::Email),
                IdentifierConfig::new("id", "id", Normaliser::Generic),
            ],
        );
        let keys = match selector % 3 {
            0 => KeySpec::new(["email"]),
            1 => KeySpec::new(["id"]),
            _ => KeySpec::new(["email", "id"]),
        };
        let max_rows = if selector & 0x80 != 0 { u64::from(selector & 0x0f) } else { u64::MAX };
        let Ok(loaded) = load_keys(&dataset, &keys, max_rows) else {
            return;
        };
        assert!(loaded.rows_read <= max_rows);
        assert!(loaded.rows_rejected <= loaded.rows_read);
        let accepted = loaded.rows_read - loaded.rows_rejected;
        assert_eq!(accepted, loaded.items.len() as u64 + loaded.duplicate_rows);
        let items: Vec<&[u8]> = loaded.items.iter().collect();
        assert!(items.windows(2).all(|w| w[0] < w[1]), "keys not sorted and distinct");
        let parts = keys.names.len();
        for item in items {
            let seps = item.iter().filter(|&&b| b == KEY_PART_SEPARATOR).count();
            assert_eq!(seps, parts - 1, "a key with the wrong number of parts");
            assert!(std::str::from_utf8(item).is_ok(), "a key that is not UTF-8");
            assert!(item.split(|&b| b == KEY_PART_SEPARATOR).all(|p| !p.is_empty()));
        }
    });
});
