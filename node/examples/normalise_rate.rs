//! Normaliser throughput (items per second, one thread): the phone and email normalisers over
//! synthetic identifiers in the surface forms real exports have.
//!
//! `cargo run --release -p cleanroom-node --example normalise_rate [ITEMS] [ROUNDS]`
//! prints one line per normaliser with the median of ROUNDS runs over ITEMS values.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use cleanroom_node::data::normalise::{NormaliseOptions, Normaliser};

/// Phone numbers in eight layouts: North American (as `cleanroom synth` writes them) and
/// British with and without the trunk prefix in parentheses.
fn phones(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            let p = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let area = 201 + p % 798;
            let exchange = 200 + (p >> 16) % 800;
            let line = (p >> 32) % 10_000;
            match i % 8 {
                0 => format!("+1 {area}-{exchange}-{line:04}"),
                1 => format!("({area}) {exchange}-{line:04}"),
                2 => format!("{area}.{exchange}.{line:04}"),
                3 => format!("1-{area}-{exchange}-{line:04}"),
                4 => format!("+1{area}{exchange}{line:04}"),
                5 => format!("001 {area} {exchange} {line:04}"),
                6 => format!("+44 (0)20 7946 {:04}", line % 1000),
                _ => format!("+44 20 7946 {:04}", line % 1000),
            }
        })
        .collect()
}

fn emails(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!("  Customer.{i}@Example{}.COM ", i % 97))
        .collect()
}

/// Median items/s of `rounds` passes of `n` over `values`.
fn rate(n: Normaliser, values: &[String], rounds: usize) -> (f64, usize) {
    let options = NormaliseOptions::default();
    let mut rates = Vec::with_capacity(rounds);
    let mut ok = 0;
    for _ in 0..rounds {
        let start = Instant::now();
        ok = values
            .iter()
            .filter(|v| n.normalise_with(v, &options).is_ok())
            .count();
        rates.push(values.len() as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    (rates[rates.len() / 2], ok)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let items: u64 = args.next().map_or(200_000, |a| a.parse().unwrap());
    let rounds: usize = args.next().map_or(5, |a| a.parse().unwrap());
    for (n, values) in [
        (Normaliser::Phone, phones(items)),
        (Normaliser::Email, emails(items)),
    ] {
        let (r, ok) = rate(n, &values, rounds);
        println!(
            "{n}: {r:.0} items/s (median of {rounds} runs of {items}; {ok} normalised; 1 thread)"
        );
    }
}
