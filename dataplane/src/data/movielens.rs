//! MovieLens-100K, fetched from the PyPI wheel of RecBole.
//!
//! 100000 ratings (1 to 5) of 1682 movies by 943 users, collected by
//! GroupLens. The wheel `recbole==1.2.1` ships them as
//! `recbole/dataset_example/ml-100k/ml-100k.inter`, a tab-separated file
//! with the header `user_id:token item_id:token rating:float timestamp:float`.
//! The wheel is fetched with `python3 -m pip download --no-deps` into a
//! scratch directory, and that one member is extracted with Python's
//! `zipfile` into `<cache>/movielens-100k/`. The file is never committed.
//!
//! User and item tokens are mapped to dense indices in ascending order of
//! the tokens (numerically, as they are all numbers here), so user `k` is
//! the token `k + 1`. The test set is a fixed 10% of the ratings, chosen by
//! a shuffle with [`SPLIT_SEED`].

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use super::fetch::{self, ExpectedFile, io_error};
use super::rng::{SplitMix64, shuffle};
use super::{DataError, DataSet, Examples, Ratings};

/// The PyPI requirement whose wheel holds the ratings.
pub const REQUIREMENT: &str = "recbole==1.2.1";

/// Path of the ratings inside the wheel.
pub const MEMBER: &str = "recbole/dataset_example/ml-100k/ml-100k.inter";

/// Directory of the data set inside the cache.
pub const CACHE_DIR: &str = "movielens-100k";

/// The ratings file, with its SHA-256.
pub const FILE: ExpectedFile = ExpectedFile {
    name: "ml-100k.inter",
    sha256: "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
};

/// Seed of the shuffle that picks the test ratings; fixed, so every run
/// and every process holds out the same ratings.
pub const SPLIT_SEED: u64 = 0x006d_6c2d_3130_306b; // "ml-100k" in ASCII

/// Share of the ratings held out for test, in percent.
pub const TEST_PERCENT: usize = 10;

/// Python program extracting member `argv[2]` of zip `argv[1]` to file `argv[3]`.
const EXTRACT: &str = "import sys, zipfile\n\
    with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[3], 'wb') as out:\n    \
    out.write(z.read(sys.argv[2]))\n";

/// Loads MovieLens-100K from `cache`, fetching it first if needed.
pub fn load(cache: &Path) -> Result<DataSet, DataError> {
    let dir = fetch::ensure_cached(cache, CACHE_DIR, &[FILE], fetch_wheel)?;
    let path = dir.join(FILE.name);
    let bytes = fetch::read_verified(&path, FILE.sha256)?;
    let text = std::str::from_utf8(&bytes).map_err(|e| DataError::Format {
        file: FILE.name.to_owned(),
        detail: format!("not UTF-8: {e}"),
    })?;
    let all = parse_inter(text, FILE.name)?;
    Ok(split(&all))
}

/// Downloads the wheel into `work` and extracts the ratings into `out`.
fn fetch_wheel(work: &Path, out: &Path) -> Result<(), DataError> {
    let python = python();
    fetch::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(["--quiet", "--dest"])
            .arg(work)
            .arg(REQUIREMENT),
    )?;
    let wheel = find_wheel(work)?;
    let to = out.join(FILE.name);
    fetch::run(
        Command::new(&python)
            .args(["-c", EXTRACT])
            .arg(&wheel)
            .arg(MEMBER)
            .arg(&to),
    )
    .map_err(|e| match e {
        DataError::Command { detail, .. } if detail.contains("KeyError") => {
            DataError::MissingFile {
                package: REQUIREMENT.to_owned(),
                file: MEMBER.to_owned(),
            }
        }
        other => other,
    })?;
    Ok(())
}

/// The Python interpreter: `$GEOML_PYTHON`, else `python3`.
fn python() -> std::ffi::OsString {
    std::env::var_os("GEOML_PYTHON")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// The wheel that pip left in `work`.
fn find_wheel(work: &Path) -> Result<std::path::PathBuf, DataError> {
    let entries = fs::read_dir(work).map_err(|source| io_error("listing", work, source))?;
    for entry in entries {
        let path = entry
            .map_err(|source| io_error("listing", work, source))?
            .path();
        if path.extension().is_some_and(|e| e == "whl") {
            return Ok(path);
        }
    }
    Err(DataError::MissingFile {
        package: format!("the output of `pip download {REQUIREMENT}`"),
        file: "*.whl".to_owned(),
    })
}

/// Parses a RecBole `.inter` file (header line, then `user item rating
/// timestamp` separated by tabs) into ratings over dense user and item
/// indices; `file` names it in errors.
pub fn parse_inter(text: &str, file: &str) -> Result<Ratings, DataError> {
    let bad = |line: usize, detail: String| DataError::Format {
        file: file.to_owned(),
        detail: format!("line {line}: {detail}"),
    };
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, h)| h).unwrap_or_default();
    let columns: Vec<&str> = header.split('\t').collect();
    if columns.get(..3) != Some(&["user_id:token", "item_id:token", "rating:float"][..]) {
        return Err(bad(1, format!("unexpected header {header:?}")));
    }

    let mut raw = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split('\t');
        let (Some(user), Some(item), Some(rating)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(bad(i + 1, format!("fewer than 3 fields in {line:?}")));
        };
        let rating: f32 = rating
            .trim()
            .parse()
            .map_err(|e| bad(i + 1, format!("rating {rating:?}: {e}")))?;
        raw.push((user.trim(), item.trim(), rating));
    }

    let users = dense_indices(raw.iter().map(|r| r.0));
    let items = dense_indices(raw.iter().map(|r| r.1));
    let index =
        |map: &BTreeMap<Token<'_>, u32>, t: &str| map.get(&Token::new(t)).copied().unwrap_or(0);
    Ok(Ratings {
        users: raw.iter().map(|r| index(&users, r.0)).collect(),
        items: raw.iter().map(|r| index(&items, r.1)).collect(),
        ratings: raw.iter().map(|r| r.2).collect(),
        num_users: users.len(),
        num_items: items.len(),
    })
}

/// A token ordered numerically when it is a number (numbers first), else
/// as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Token<'a> {
    Number(u64),
    Text(&'a str),
}

impl<'a> Token<'a> {
    fn new(token: &'a str) -> Self {
        token.parse().map_or(Token::Text(token), Token::Number)
    }
}

/// Maps each distinct token to its rank among the distinct tokens.
fn dense_indices<'a>(tokens: impl Iterator<Item = &'a str>) -> BTreeMap<Token<'a>, u32> {
    let mut map: BTreeMap<Token<'a>, u32> = tokens.map(|t| (Token::new(t), 0)).collect();
    for (rank, value) in (0u32..).zip(map.values_mut()) {
        *value = rank;
    }
    map
}

/// Splits all ratings into train and test: a shuffle seeded with
/// [`SPLIT_SEED`] picks [`TEST_PERCENT`]% for test. Both keep the ratings
/// in file order.
#[must_use]
pub fn split(all: &Ratings) -> DataSet {
    let n = all.ratings.len();
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, &mut SplitMix64::new(SPLIT_SEED));
    let (test, train) = order.split_at_mut(n * TEST_PERCENT / 100);
    train.sort_unstable();
    test.sort_unstable();
    let all = Examples::Ratings(all.clone());
    DataSet {
        train: all.select(train),
        test: all.select(test),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n\
        196\t242\t3\t881250949\n\
        186\t302\t3\t891717742\n\
        22\t377\t1\t878887116\n\
        196\t51\t2\t880606923\n";

    #[test]
    fn parses_and_densifies_tokens() {
        let r = parse_inter(SAMPLE, "s").unwrap();
        // Users 22, 186, 196 -> 0, 1, 2; items 51, 242, 302, 377 -> 0..4.
        assert_eq!(r.users, vec![2, 1, 0, 2]);
        assert_eq!(r.items, vec![1, 2, 3, 0]);
        assert_eq!(r.ratings, vec![3.0, 3.0, 1.0, 2.0]);
        assert_eq!((r.num_users, r.num_items), (3, 4));
    }

    #[test]
    fn rejects_bad_header_and_bad_rating() {
        let err = parse_inter("a\tb\n1\t2\t3\n", "s").unwrap_err();
        assert!(err.to_string().contains("header"), "{err}");
        let bad = SAMPLE.replace("\t1\t", "\tone\t");
        let err = parse_inter(&bad, "s").unwrap_err();
        assert!(err.to_string().contains("line 4"), "{err}");
    }

    #[test]
    fn split_is_fixed_and_disjoint() {
        let n = 1000;
        let all = Ratings {
            users: (0..n).collect(),
            items: vec![0; 1000],
            ratings: (0..n)
                .map(|i| f32::from(u16::try_from(i).unwrap()))
                .collect(),
            num_users: 1000,
            num_items: 1,
        };
        let a = split(&all);
        let b = split(&all);
        let (Examples::Ratings(train), Examples::Ratings(test)) = (&a.train, &a.test) else {
            panic!("kind changed");
        };
        assert_eq!((train.ratings.len(), test.ratings.len()), (900, 100));
        let Examples::Ratings(test_b) = &b.test else {
            panic!("kind changed");
        };
        assert_eq!(test.users, test_b.users);
        let mut every: Vec<u32> = train.users.iter().chain(&test.users).copied().collect();
        every.sort_unstable();
        assert_eq!(every, (0..n).collect::<Vec<_>>());
        assert_eq!(train.num_users, 1000);
    }
}
