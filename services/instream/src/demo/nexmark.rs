//! A Nexmark-shaped auction stream (after the generator of the Nexmark benchmark): people and
//! auctions are the reference data, bids are the stream. Deterministic (xorshift), so two runs
//! with the same rate produce the same events.
//!
//! Like Nexmark, bids are skewed: half go to a few hot auctions and a quarter come from a few hot
//! bidders. Two kinds of bad input are mixed in on purpose, so that the demo shows where they
//! go: a bid for an auction opened after the reference data was loaded (the enricher finds no
//! record and dead-letters it), and a bid without a price (ingest refuses that one event and
//! accepts the rest of its batch).

use serde_json::{json, Value};

pub const PEOPLE: u64 = 1_000;
pub const AUCTIONS: u64 = 1_000;
/// Ids of people and auctions start here, as in Nexmark.
pub const FIRST_PERSON_ID: u64 = 1_000;
pub const FIRST_AUCTION_ID: u64 = 1_000;
const HOT_AUCTIONS: u64 = 8;
const HOT_BIDDERS: u64 = 20;
/// One bid in this many names an auction missing from the reference data.
const UNKNOWN_AUCTION_EVERY: u64 = 400;
/// One bid in this many has no price.
const PRICELESS_EVERY: u64 = 1_000;

const CITIES: [(&str, &str); 10] = [
    ("Phoenix", "AZ"),
    ("Los Angeles", "CA"),
    ("San Francisco", "CA"),
    ("Boise", "ID"),
    ("Portland", "OR"),
    ("Bend", "OR"),
    ("Redmond", "WA"),
    ("Seattle", "WA"),
    ("Kent", "WA"),
    ("Cheyenne", "WY"),
];
const FIRST_NAMES: [&str; 11] = [
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter",
];
const LAST_NAMES: [&str; 9] = [
    "Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris",
];
pub const CATEGORIES: [&str; 5] = ["books", "cameras", "furniture", "music", "watches"];
const CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];

/// The reference data: one JSON line per person (`person:<id>`) and per auction
/// (`auction:<id>`), in the format `refdata.seed_file` reads.
pub fn reference_data() -> String {
    let mut rng = Rng(0x005E_ED0F_DA7A);
    let mut out = String::new();
    for i in 0..PEOPLE {
        let id = FIRST_PERSON_ID + i;
        let (city, state) = CITIES[rng.below(CITIES.len() as u64) as usize];
        let first = FIRST_NAMES[rng.below(FIRST_NAMES.len() as u64) as usize];
        let last = LAST_NAMES[rng.below(LAST_NAMES.len() as u64) as usize];
        let line = json!({"key": format!("person:{id}"), "fields": {
            "name": format!("{first} {last}"),
            "email": format!("{}.{}{id}@example.com", first.to_lowercase(), last.to_lowercase()),
            "city": city,
            "state": state,
        }});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    for i in 0..AUCTIONS {
        let id = FIRST_AUCTION_ID + i;
        let initial_bid = 10 + rng.below(990);
        let line = json!({"key": format!("auction:{id}"), "fields": {
            "item_name": format!("item-{id}"),
            "category": CATEGORIES[(i % CATEGORIES.len() as u64) as usize],
            "seller": (FIRST_PERSON_ID + rng.below(PEOPLE)).to_string(),
            "initial_bid": initial_bid.to_string(),
            "reserve": (initial_bid * (2 + rng.below(4))).to_string(),
        }});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// The stream of bids.
pub struct Bids {
    rng: Rng,
    sent: u64,
}

impl Default for Bids {
    fn default() -> Self {
        Bids {
            rng: Rng(0x9E37_79B9_7F4A_7C15),
            sent: 0,
        }
    }
}

impl Bids {
    /// The next bid, stamped with `now_millis` as its event time.
    pub fn next_bid(&mut self, now_millis: i64) -> Value {
        self.sent += 1;
        let rng = &mut self.rng;
        let auction = if self.sent.is_multiple_of(UNKNOWN_AUCTION_EVERY) {
            FIRST_AUCTION_ID + AUCTIONS + rng.below(100)
        } else if rng.below(2) == 0 {
            FIRST_AUCTION_ID + rng.below(HOT_AUCTIONS)
        } else {
            FIRST_AUCTION_ID + rng.below(AUCTIONS)
        };
        let bidder = if rng.below(4) == 0 {
            FIRST_PERSON_ID + rng.below(HOT_BIDDERS)
        } else {
            FIRST_PERSON_ID + rng.below(PEOPLE)
        };
        let channel = CHANNELS[rng.below(CHANNELS.len() as u64) as usize];
        let mut bid = json!({
            "auction": auction,
            "bidder": bidder,
            // Cents; Nexmark draws prices from a wide, skewed range too.
            "price": 100 + rng.below(10_000) * (1 + rng.below(10)),
            "channel": channel,
            "url": format!("https://www.nexmark.com/{}/item.htm?query={}", channel.to_lowercase(), rng.below(1000)),
            "date_time": now_millis,
        });
        if self.sent.is_multiple_of(PRICELESS_EVERY) {
            if let Some(fields) = bid.as_object_mut() {
                fields.remove("price");
            }
        }
        bid
    }
}

/// xorshift64: fast, deterministic, good enough for a demo stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_data_covers_every_person_and_auction() {
        let data = reference_data();
        assert_eq!(data.lines().count() as u64, PEOPLE + AUCTIONS);
        for line in data.lines() {
            let v: Value = serde_json::from_str(line).expect("each line is JSON");
            assert!(v["key"].is_string() && v["fields"].is_object(), "{line}");
        }
    }

    #[test]
    fn bids_mix_in_the_documented_bad_input() {
        let mut bids = Bids::default();
        let all: Vec<Value> = (0..10_000).map(|_| bids.next_bid(0)).collect();
        let priceless = all.iter().filter(|b| b.get("price").is_none()).count();
        let unknown = all
            .iter()
            .filter(|b| b["auction"].as_u64().unwrap_or(0) >= FIRST_AUCTION_ID + AUCTIONS)
            .count();
        assert_eq!(priceless, 10);
        assert_eq!(unknown, 25);
        let hot = all
            .iter()
            .filter(|b| b["auction"].as_u64().unwrap_or(0) < FIRST_AUCTION_ID + HOT_AUCTIONS)
            .count();
        assert!(hot > 4_000, "half the bids go to hot auctions, got {hot}");
    }
}
