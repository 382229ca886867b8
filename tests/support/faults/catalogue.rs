//! The catalogue workload: a model of staging's rows generates random valid transactions.

use std::collections::HashMap;
use std::hash::Hash;

use super::Rng;

pub const CATALOGUE: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber text NOT NULL UNIQUE,
  price numeric(12,2), counter int NOT NULL DEFAULT 0, descr text, data bytea, attrs jsonb,
  published bool);
ALTER TABLE catentry ALTER descr SET STORAGE EXTERNAL;
CREATE TABLE catentdesc (catentry_id bigint REFERENCES catentry ON DELETE CASCADE,
  language_id int, name text, longdescription text, PRIMARY KEY (catentry_id, language_id));
ALTER TABLE catentdesc ALTER longdescription SET STORAGE EXTERNAL;
CREATE TABLE offer (offer_id bigint, store_id int,
  catentry_id bigint NOT NULL REFERENCES catentry ON DELETE CASCADE, published bool,
  PRIMARY KEY (offer_id, store_id));
CREATE TABLE offerprice (offer_id bigint, store_id int, currency char(3), price numeric(20,5),
  note text, PRIMARY KEY (offer_id, store_id, currency),
  FOREIGN KEY (offer_id, store_id) REFERENCES offer ON DELETE CASCADE);
";

pub const CATALOGUE_TABLES: &[(&str, &str)] = &[
    ("catentry", "catentry_id"),
    ("catentdesc", "catentry_id, language_id"),
    ("offer", "offer_id, store_id"),
    ("offerprice", "offer_id, store_id, currency"),
];

pub const LANGUAGES: [i32; 6] = [-1, -2, -3, -4, -5, -6];
pub const CURRENCIES: [&str; 6] = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD"];
pub const STORES: [i32; 2] = [1, 2];

/// A set with O(1) insert, remove and random pick.
pub struct IndexedSet<T> {
    pub items: Vec<T>,
    pub index: HashMap<T, usize>,
}

impl<T: Copy + Eq + Hash> IndexedSet<T> {
    pub fn new() -> Self {
        IndexedSet {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }

    pub fn insert(&mut self, item: T) {
        if !self.index.contains_key(&item) {
            self.index.insert(item, self.items.len());
            self.items.push(item);
        }
    }

    pub fn remove(&mut self, item: &T) {
        if let Some(i) = self.index.remove(item) {
            self.items.swap_remove(i);
            if i < self.items.len() {
                self.index.insert(self.items[i], i);
            }
        }
    }

    pub fn contains(&self, item: &T) -> bool {
        self.index.contains_key(item)
    }

    pub fn pick(&self, rng: &mut Rng) -> Option<T> {
        (!self.items.is_empty()).then(|| self.items[rng.below(self.items.len() as u64) as usize])
    }
}

/// What staging holds, so that every generated statement is valid (one failure would abort the
/// rest of its psql call and desynchronise the model).
pub struct Catalogue {
    pub rng: Rng,
    pub entries: IndexedSet<i64>,
    pub partnumbers: HashMap<i64, String>,
    pub descs: HashMap<i64, Vec<i32>>,
    pub offers: IndexedSet<(i64, i32)>,
    pub offer_parent: HashMap<(i64, i32), i64>,
    pub offers_of: HashMap<i64, Vec<(i64, i32)>>,
    pub prices: HashMap<(i64, i32), Vec<&'static str>>,
    pub next_id: i64,
    pub next_offer: i64,
    pub serial: u64,
    pub bulk_start: Option<(i64, i64)>,
}

impl Catalogue {
    pub fn new(seed: u64) -> Catalogue {
        Catalogue {
            rng: Rng::new(seed),
            entries: IndexedSet::new(),
            partnumbers: HashMap::new(),
            descs: HashMap::new(),
            offers: IndexedSet::new(),
            offer_parent: HashMap::new(),
            offers_of: HashMap::new(),
            prices: HashMap::new(),
            next_id: 1,
            next_offer: 1,
            serial: 0,
            bulk_start: None,
        }
    }

    pub fn serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    // Values, as SQL literals.

    pub fn price(&mut self) -> String {
        if self.rng.percent(10) {
            "NULL".into()
        } else {
            format!("{}.{:02}", self.rng.below(10_000), self.rng.below(100))
        }
    }

    pub fn boolean(&mut self) -> &'static str {
        self.rng.pick(&["NULL", "true", "false"])
    }

    pub fn name(&mut self) -> String {
        let n = self.serial();
        match self.rng.below(10) {
            0 => "NULL".into(),
            1 => format!("'O''Brien \"{n}\" é ü ✓'"),
            2 => format!("E'line one\\nline two {n}\\t\\\\'"),
            _ => format!("'name {n}'"),
        }
    }

    /// NULL, a short text, or a long one (often over 8 KB) that is stored out of line.
    pub fn toast(&mut self) -> String {
        let n = self.serial();
        match self.rng.below(20) {
            0..=2 => "NULL".into(),
            3..=7 => format!("'short {n}'"),
            _ => {
                let len = self.rng.between(2_500, 20_000);
                format!("repeat('t{n:07}', {})", len / 8)
            }
        }
    }

    pub fn bytea(&mut self) -> String {
        match self.rng.below(10) {
            0..=1 => "NULL".into(),
            2 => format!("convert_to(repeat('bin{}', 1500), 'UTF8')", self.serial()),
            _ => {
                let len = self.rng.below(40);
                let hex: String = (0..len)
                    .map(|_| format!("{:02x}", self.rng.below(256)))
                    .collect();
                format!("'\\x{hex}'::bytea")
            }
        }
    }

    pub fn json(&mut self) -> String {
        let n = self.serial();
        match self.rng.below(5) {
            0 => "NULL".into(),
            1 => "'[]'::jsonb".into(),
            _ => format!(
                "jsonb_build_object('n', {n}, 'tags', jsonb_build_array('a{n}', NULL, true), \
                 'nested', jsonb_build_object('x', 1.5, 's', 'it''s \"quoted\"'))"
            ),
        }
    }

    // Picking existing rows.

    pub fn pick_desc(&mut self) -> Option<(i64, i32)> {
        for _ in 0..8 {
            let id = self.entries.pick(&mut self.rng)?;
            if let Some(languages) = self.descs.get(&id).filter(|l| !l.is_empty()) {
                let l = languages[self.rng.below(languages.len() as u64) as usize];
                return Some((id, l));
            }
        }
        None
    }

    pub fn pick_price(&mut self) -> Option<((i64, i32), &'static str)> {
        for _ in 0..8 {
            let offer = self.offers.pick(&mut self.rng)?;
            if let Some(currencies) = self.prices.get(&offer).filter(|c| !c.is_empty()) {
                let c = currencies[self.rng.below(currencies.len() as u64) as usize];
                return Some((offer, c));
            }
        }
        None
    }

    pub fn free_language(&mut self, id: i64) -> Option<i32> {
        let used = self.descs.get(&id).cloned().unwrap_or_default();
        let free: Vec<i32> = LANGUAGES
            .iter()
            .copied()
            .filter(|l| !used.contains(l))
            .collect();
        (!free.is_empty()).then(|| self.rng.pick(&free))
    }

    pub fn free_currency(&mut self, offer: (i64, i32)) -> Option<&'static str> {
        let used = self.prices.get(&offer).cloned().unwrap_or_default();
        let free: Vec<&'static str> = CURRENCIES
            .iter()
            .copied()
            .filter(|c| !used.contains(c))
            .collect();
        (!free.is_empty()).then(|| self.rng.pick(&free))
    }

    // Model updates.

    pub fn forget_offer(&mut self, offer: (i64, i32)) {
        self.offers.remove(&offer);
        self.prices.remove(&offer);
        if let Some(parent) = self.offer_parent.remove(&offer)
            && let Some(list) = self.offers_of.get_mut(&parent)
        {
            list.retain(|o| *o != offer);
        }
    }

    /// A catentry delete, with what ON DELETE CASCADE takes along.
    pub fn forget_entry(&mut self, id: i64) {
        self.entries.remove(&id);
        self.partnumbers.remove(&id);
        self.descs.remove(&id);
        for offer in self.offers_of.remove(&id).unwrap_or_default() {
            self.offers.remove(&offer);
            self.prices.remove(&offer);
            self.offer_parent.remove(&offer);
        }
    }

    // Operations: each appends valid SQL; false when there was nothing to act on.

    pub fn insert_entry(&mut self, sql: &mut String) {
        let id = self.next_id;
        self.next_id += 1;
        let partnumber = format!("PN-{id}");
        let (price, descr, data, attrs, published) = (
            self.price(),
            self.toast(),
            self.bytea(),
            self.json(),
            self.boolean(),
        );
        sql.push_str(&format!(
            "INSERT INTO catentry (catentry_id, partnumber, price, descr, data, attrs, published) \
             VALUES ({id}, '{partnumber}', {price}, {descr}, {data}, {attrs}, {published});\n"
        ));
        self.entries.insert(id);
        self.partnumbers.insert(id, partnumber);
        for _ in 0..self.rng.below(4) {
            self.insert_desc_for(id, sql);
        }
        for _ in 0..self.rng.below(3) {
            self.insert_offer_for(id, sql);
        }
    }

    pub fn insert_desc_for(&mut self, id: i64, sql: &mut String) -> bool {
        let Some(language) = self.free_language(id) else {
            return false;
        };
        let (name, long) = (self.name(), self.toast());
        sql.push_str(&format!(
            "INSERT INTO catentdesc VALUES ({id}, {language}, {name}, {long});\n"
        ));
        self.descs.entry(id).or_default().push(language);
        true
    }

    pub fn insert_offer_for(&mut self, id: i64, sql: &mut String) {
        let offer_id = self.next_offer;
        self.next_offer += 1;
        for store in STORES {
            if store == 2 && self.rng.percent(50) {
                continue;
            }
            let published = self.boolean();
            sql.push_str(&format!(
                "INSERT INTO offer VALUES ({offer_id}, {store}, {id}, {published});\n"
            ));
            let offer = (offer_id, store);
            self.offers.insert(offer);
            self.offer_parent.insert(offer, id);
            self.offers_of.entry(id).or_default().push(offer);
            for _ in 0..self.rng.below(4) {
                self.insert_price_for(offer, sql);
            }
        }
    }

    pub fn insert_price_for(&mut self, offer: (i64, i32), sql: &mut String) -> bool {
        let Some(currency) = self.free_currency(offer) else {
            return false;
        };
        let (price, note) = (self.price(), self.name());
        sql.push_str(&format!(
            "INSERT INTO offerprice VALUES ({}, {}, '{currency}', {price}, {note});\n",
            offer.0, offer.1
        ));
        self.prices.entry(offer).or_default().push(currency);
        true
    }

    pub fn random_op(&mut self, sql: &mut String) {
        // Op 19 (a unique-column swap) costs a one-by-one replay each time: see `swap`.
        const WEIGHTS: [u64; 21] = [
            18, 14, 6, 6, 4, 8, 8, 4, 5, 4, 2, 5, 3, 2, 5, 6, 5, 3, 2, 0, 3,
        ];
        let total: u64 = WEIGHTS.iter().sum();
        let mut roll = self.rng.below(total);
        let mut op = 0;
        while roll >= WEIGHTS[op] {
            roll -= WEIGHTS[op];
            op += 1;
        }
        if !self.op(op, sql) {
            self.insert_entry(sql);
        }
    }

    pub fn op(&mut self, op: usize, sql: &mut String) -> bool {
        match op {
            0 => {
                self.insert_entry(sql);
                true
            }
            // Only columns that are not TOASTed: descr must arrive as 'unchanged'.
            1 => {
                let ids: Vec<String> = (0..self.rng.between(1, 3))
                    .filter_map(|_| self.entries.pick(&mut self.rng))
                    .map(|id| id.to_string())
                    .collect();
                if ids.is_empty() {
                    return false;
                }
                let price = self.price();
                sql.push_str(&format!(
                    "UPDATE catentry SET counter = counter + 1, price = {price} WHERE catentry_id IN ({});\n",
                    ids.join(", ")
                ));
                true
            }
            2 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                let descr = self.toast();
                sql.push_str(&format!(
                    "UPDATE catentry SET descr = {descr} WHERE catentry_id = {id};\n"
                ));
                true
            }
            3 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                let (data, attrs, published) = (self.bytea(), self.json(), self.boolean());
                sql.push_str(&format!(
                    "UPDATE catentry SET data = {data}, attrs = {attrs}, published = {published} WHERE catentry_id = {id};\n"
                ));
                true
            }
            4 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                sql.push_str(&format!("DELETE FROM catentry WHERE catentry_id = {id};\n"));
                self.forget_entry(id);
                true
            }
            5 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                self.insert_desc_for(id, sql)
            }
            6 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                let name = self.name();
                sql.push_str(&format!(
                    "UPDATE catentdesc SET name = {name} WHERE catentry_id = {id} AND language_id = {l};\n"
                ));
                true
            }
            7 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                let long = self.toast();
                sql.push_str(&format!(
                    "UPDATE catentdesc SET longdescription = {long} WHERE catentry_id = {id} AND language_id = {l};\n"
                ));
                true
            }
            // Key change on a leaf table (longdescription usually arrives 'unchanged').
            8 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                let Some(to) = self.free_language(id) else {
                    return false;
                };
                let name = if self.rng.percent(50) {
                    format!(", name = {}", self.name())
                } else {
                    String::new()
                };
                sql.push_str(&format!(
                    "UPDATE catentdesc SET language_id = {to}{name} WHERE catentry_id = {id} AND language_id = {l};\n"
                ));
                let languages = self.descs.get_mut(&id).expect("picked");
                languages.retain(|x| *x != l);
                languages.push(to);
                true
            }
            9 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                sql.push_str(&format!(
                    "DELETE FROM catentdesc WHERE catentry_id = {id} AND language_id = {l};\n"
                ));
                self.descs.get_mut(&id).expect("picked").retain(|x| *x != l);
                true
            }
            // Deleted and inserted again with the same key.
            10 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                let (name, long) = (self.name(), self.toast());
                sql.push_str(&format!(
                    "DELETE FROM catentdesc WHERE catentry_id = {id} AND language_id = {l};\n\
                     INSERT INTO catentdesc VALUES ({id}, {l}, {name}, {long});\n"
                ));
                true
            }
            11 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                self.insert_offer_for(id, sql);
                true
            }
            12 => {
                let Some((o, s)) = self.offers.pick(&mut self.rng) else {
                    return false;
                };
                let published = self.boolean();
                sql.push_str(&format!(
                    "UPDATE offer SET published = {published} WHERE offer_id = {o} AND store_id = {s};\n"
                ));
                true
            }
            13 => {
                let Some((o, s)) = self.offers.pick(&mut self.rng) else {
                    return false;
                };
                sql.push_str(&format!(
                    "DELETE FROM offer WHERE offer_id = {o} AND store_id = {s};\n"
                ));
                self.forget_offer((o, s));
                true
            }
            14 => {
                let Some(offer) = self.offers.pick(&mut self.rng) else {
                    return false;
                };
                self.insert_price_for(offer, sql)
            }
            15 => {
                let Some(((o, s), c)) = self.pick_price() else {
                    return false;
                };
                let price = self.price();
                sql.push_str(&format!(
                    "UPDATE offerprice SET price = {price} WHERE offer_id = {o} AND store_id = {s} AND currency = '{c}';\n"
                ));
                true
            }
            // Key change on a leaf table.
            16 => {
                let Some(((o, s), c)) = self.pick_price() else {
                    return false;
                };
                let Some(to) = self.free_currency((o, s)) else {
                    return false;
                };
                sql.push_str(&format!(
                    "UPDATE offerprice SET currency = '{to}' WHERE offer_id = {o} AND store_id = {s} AND currency = '{c}';\n"
                ));
                let currencies = self.prices.get_mut(&(o, s)).expect("picked");
                currencies.retain(|x| *x != c);
                currencies.push(to);
                true
            }
            17 => {
                let Some(((o, s), c)) = self.pick_price() else {
                    return false;
                };
                sql.push_str(&format!(
                    "DELETE FROM offerprice WHERE offer_id = {o} AND store_id = {s} AND currency = '{c}';\n"
                ));
                self.prices
                    .get_mut(&(o, s))
                    .expect("picked")
                    .retain(|x| *x != c);
                true
            }
            18 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                let partnumber = format!("PN-{id}-{}", self.serial());
                sql.push_str(&format!(
                    "UPDATE catentry SET partnumber = '{partnumber}' WHERE catentry_id = {id};\n"
                ));
                self.partnumbers.insert(id, partnumber);
                true
            }
            // Two rows swap a unique column: set-based apply may trip the unique index where
            // staging's order did not.
            19 => {
                let (Some(a), Some(b)) = (
                    self.entries.pick(&mut self.rng),
                    self.entries.pick(&mut self.rng),
                ) else {
                    return false;
                };
                if a == b {
                    return false;
                }
                let pa = self.partnumbers[&a].clone();
                let pb = self.partnumbers[&b].clone();
                sql.push_str(&format!(
                    "UPDATE catentry SET partnumber = 'swap-{a}' WHERE catentry_id = {a};\n\
                     UPDATE catentry SET partnumber = '{pa}' WHERE catentry_id = {b};\n\
                     UPDATE catentry SET partnumber = '{pb}' WHERE catentry_id = {a};\n"
                ));
                self.partnumbers.insert(a, pb);
                self.partnumbers.insert(b, pa);
                true
            }
            // The same row several times in one transaction.
            _ => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                let (d1, d2) = (self.toast(), self.price());
                sql.push_str(&format!(
                    "UPDATE catentry SET descr = {d1} WHERE catentry_id = {id};\n\
                     UPDATE catentry SET price = {d2}, counter = counter + 1 WHERE catentry_id = {id};\n\
                     UPDATE catentry SET counter = counter * 2 WHERE catentry_id = {id};\n"
                ));
                true
            }
        }
    }

    /// A random small transaction.
    pub fn transaction(&mut self) -> String {
        let mut sql = String::from("BEGIN;\n");
        for _ in 0..self.rng.between(1, 6) {
            self.random_op(&mut sql);
        }
        sql.push_str("COMMIT;\n");
        sql
    }

    /// Two catentries swap partnumbers (a unique column) in one transaction, among other changes.
    pub fn swap(&mut self) -> String {
        let mut sql = String::from("BEGIN;\n");
        self.random_op(&mut sql);
        if !self.op(19, &mut sql) {
            self.random_op(&mut sql);
        }
        self.random_op(&mut sql);
        sql.push_str("COMMIT;\n");
        sql
    }

    /// TRUNCATE of a leaf table.
    pub fn truncate(&mut self) -> String {
        if self.rng.percent(50) {
            self.prices.clear();
            "BEGIN; TRUNCATE offerprice; COMMIT;\n".into()
        } else {
            self.descs.clear();
            "BEGIN; TRUNCATE catentdesc; COMMIT;\n".into()
        }
    }

    /// 10k-50k rows in one transaction: catentries with a description each.
    pub fn bulk_insert(&mut self) -> String {
        let n = self.rng.between(5_000, 25_000) as i64;
        let (a, b) = (self.next_id, self.next_id + n - 1);
        self.next_id = b + 1;
        self.bulk_start = Some((a, b));
        for id in a..=b {
            self.entries.insert(id);
            self.partnumbers.insert(id, format!("PN-{id}"));
            self.descs.insert(id, vec![-1]);
        }
        format!(
            "BEGIN;
             INSERT INTO catentry (catentry_id, partnumber, price, descr, attrs)
               SELECT g, 'PN-' || g, (g % 1000) + 0.25,
                      CASE WHEN g % 50 = 0 THEN repeat('bulk' || g, 2000) END, jsonb_build_object('g', g)
               FROM generate_series({a}, {b}) g;
             INSERT INTO catentdesc (catentry_id, language_id, name)
               SELECT g, -1, 'bulk ' || g FROM generate_series({a}, {b}) g;
             COMMIT;\n"
        )
    }

    /// Many rows updated in one transaction, TOAST columns untouched.
    pub fn bulk_update(&mut self) -> String {
        "BEGIN;
         UPDATE catentdesc SET name = coalesce(name, '') || '*' WHERE catentry_id % 2 = 0;
         UPDATE catentry SET counter = counter + 1 WHERE catentry_id % 3 = 0;
         COMMIT;\n"
            .into()
    }

    /// A third of the bulk-inserted catentries deleted at once, with their cascades.
    pub fn bulk_delete(&mut self) -> String {
        let Some((a, b)) = self.bulk_start else {
            return self.transaction();
        };
        let to = a + (b - a) / 3;
        for id in a..=to {
            if self.entries.contains(&id) {
                self.forget_entry(id);
            }
        }
        format!("BEGIN; DELETE FROM catentry WHERE catentry_id BETWEEN {a} AND {to}; COMMIT;\n")
    }
}
