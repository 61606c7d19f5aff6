"""Tuples over the cache, the image cache itself, device augmentation."""
import numpy as np
import torch

from preprocess.augment import augment, prepare_batch
from preprocess.dataset import ImageSource, evaluation_tuples, patient_images, training_tuples
from preprocess.preprocess import build_cache


def _split(demo_index, drop_mag=None):
    index = demo_index
    usable = np.ones(len(index), dtype=bool)
    if drop_mag:  # the first patient loses one magnification entirely
        first = index["patient"].iloc[0]
        usable &= ~((index["patient"] == first) & (index["mag"] == drop_mag)).to_numpy()
    return patient_images(index, usable, index["patient"].unique(), (40, 100, 200, 400))


def test_evaluation_tuples_cover_every_image_deterministically(demo_index):
    data = _split(demo_index, drop_mag=100)
    tuples, owners = evaluation_tuples(data)
    covered = set(tuples[tuples >= 0].tolist())
    assert covered == {r for rows in data.rows for mag in rows for r in mag.tolist()}
    assert (tuples[owners == 0][:, 1] == -1).all()  # the dropped magnification is marked missing
    again, _ = evaluation_tuples(data)
    assert np.array_equal(tuples, again)


def test_training_tuples_fresh_per_seed_one_patient_each(demo_index):
    data = _split(demo_index)
    a, owners = training_tuples(data, 400, np.random.default_rng(1))
    b, _ = training_tuples(data, 400, np.random.default_rng(2))
    assert not np.array_equal(a, b)
    patient_of_row = demo_index["patient"].to_numpy()
    for tup, owner in zip(a[:50], owners[:50]):
        assert set(patient_of_row[tup]) == {data.patients[owner]}
        assert list(demo_index["mag"].to_numpy()[tup]) == [40, 100, 200, 400]
    balance = data.labels[owners].mean()
    assert 0.4 < balance < 0.6  # class-balanced draw


def test_cache_is_keyed_and_reused(demo_tree, demo_index, tmp_path):
    cache, ok = build_cache(demo_index, demo_tree, tmp_path, 32, workers=2)
    assert cache.shape == (len(demo_index), 32, 49, 3) and cache.dtype == np.uint8 and ok.all()  # 700x460 aspect
    assert cache.reshape(len(cache), -1).std(axis=1).min() > 0  # every row holds a picture
    files = sorted(tmp_path.glob("*.npy"))
    again, _ = build_cache(demo_index, demo_tree, tmp_path, 32)
    assert sorted(tmp_path.glob("*.npy")) == files and np.array_equal(cache, again)
    build_cache(demo_index, demo_tree, tmp_path, 40)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # another size, another cache


def test_corrupt_file_in_cache_is_skipped(demo_tree, demo_index, tmp_path):
    import shutil
    tree = tmp_path / "tree"
    shutil.copytree(demo_tree, tree)
    victim = tree / demo_index["path"].iloc[3]
    victim.write_bytes(victim.read_bytes()[:200])
    cache, ok = build_cache(demo_index, tree, tmp_path / "cache", 32)
    assert not ok[3] and ok.sum() == len(demo_index) - 1


def test_source_gather_masks_missing_and_augment_keeps_range():
    cache = np.random.default_rng(0).integers(1, 256, (10, 16, 16, 3), dtype=np.uint8)
    images, mask = ImageSource(cache, "cpu").gather(np.array([[0, -1], [3, 4]]))
    assert images.shape == (2, 2, 16, 16, 3) and mask.tolist() == [[1, 0], [1, 1]]
    assert images[0, 1].sum() == 0 and torch.equal(images[1, 0], torch.from_numpy(cache[3]))
    x = images.reshape(4, 16 * 16, 3).float() / 255
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    normalised = prepare_batch(images, (0.5,) * 3, (0.25,) * 3, None)
    assert normalised.shape == (2, 2, 3, 16, 16)
    assert torch.allclose(normalised[1, 0, 0], (torch.from_numpy(cache[3][..., 0]).float() / 255 - 0.5) / 0.25)


def test_colour_and_stain_maps_equal_the_step_by_step_transforms():
    """The one-matrix colour and stain maps against the textbook steps (oracle)."""
    from preprocess.augment import HED_FROM_RGB, LUMA, RGB_FROM_HED, colour_map, stain_map

    x = torch.rand(3, 40, 3)
    matrix, offset = colour_map(x, torch.Generator().manual_seed(1), 0.2)
    b, c, s = 0.8 + 0.4 * torch.rand((3, 3, 1, 1), generator=torch.Generator().manual_seed(1))
    y = x * b
    y = (y - y.mean(dim=(1, 2), keepdim=True)) * c + y.mean(dim=(1, 2), keepdim=True)
    grey = (y * LUMA).sum(-1, keepdim=True)
    torch.testing.assert_close(torch.baddbmm(offset, x, matrix), (y - grey) * s + grey)

    od = torch.rand(3, 40, 3)
    matrix, offset = stain_map(torch.Generator().manual_seed(2), 3, 0.1, "cpu")
    g = torch.Generator().manual_seed(2)
    alpha, beta = 0.9 + 0.2 * torch.rand((3, 3), generator=g), -0.1 + 0.2 * torch.rand((3, 1, 3), generator=g)
    torch.testing.assert_close(torch.baddbmm(offset, od, matrix), ((od @ HED_FROM_RGB) * alpha[:, None] + beta) @ RGB_FROM_HED)


def test_flips_keep_the_frame_and_channels_last_reaches_the_model():
    from preprocess.augment import flip_rotate

    images = torch.arange(2 * 3 * 5 * 3, dtype=torch.uint8).reshape(2, 3, 5, 3)
    views = {tuple(flip_rotate(images, torch.Generator().manual_seed(k))[0].flatten().tolist()) for k in range(40)}
    expected = {tuple(v.flatten().tolist()) for v in (images[0], images[0].flip(1), images[0].flip(0, 1), images[0].flip(0))}
    assert views == expected  # identity, mirror, 180-degree turn, and both: never a 90-degree turn
    batch = prepare_batch(torch.zeros(2, 4, 6, 9, 3, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3, torch.Generator())
    assert batch.shape == (2, 4, 3, 6, 9) and batch[:, 2].is_contiguous(memory_format=torch.channels_last)


def test_bags_hold_distinct_images_of_one_patient_and_evaluation_covers_all(demo_index):
    from config import Config, experiment_config
    from preprocess.dataset import evaluation_bags, patient_images, samples_for, training_bags, tuples_per_epoch

    cfg = experiment_config(Config(bag_size=5), "mil_mean")
    data = patient_images(demo_index, np.ones(len(demo_index), bool), demo_index["patient"].unique(),
                          cfg.magnifications, cfg.sample_mode)
    bags, owners = training_bags(data, 40, 5, np.random.default_rng(0))
    for bag, owner in zip(bags, owners):
        rows = bag[bag >= 0]
        assert len(rows) == min(5, len(data.rows[owner][0])) and len(set(rows)) == len(rows)
        assert set(demo_index["patient"].to_numpy()[rows]) == {data.patients[owner]}
    whole, owners = evaluation_bags(data)
    assert sorted(whole[whole >= 0].tolist()) == list(range(len(demo_index)))  # every image, once
    assert (owners == np.arange(len(data))).all()
    assert tuples_per_epoch(data, cfg) == len(demo_index) // 5
    assert samples_for(cfg, 32) == 32 * 4 // 5 and samples_for(Config(), 32) == 32
    codes = ImageSource(np.zeros((len(demo_index), 4, 4, 3), np.uint8), "cpu", mags=demo_index["mag"].to_numpy()
                        ).gather(whole[:2], levels=True)[1]
    expected = np.where(whole[:2] >= 0, np.searchsorted([40, 100, 200, 400], demo_index["mag"].to_numpy()[whole[:2]]) + 1, 0)
    assert codes.numpy().tolist() == expected.tolist()


def test_quarter_turns_transpose_about_half_the_batches_and_never_a_fixed_frame():
    from types import SimpleNamespace

    source = ImageSource(np.random.default_rng(0).integers(0, 256, (6, 8, 12, 3), dtype=np.uint8), "cpu")
    model = SimpleNamespace(pixel_mean=(0.5,) * 3, pixel_std=(0.25,) * 3)
    tuples = np.array([[0, 1], [2, 3]])
    torch.manual_seed(0)
    shapes = [source.train_batch(tuples, model, torch.Generator().manual_seed(i), (0.1, 0.1), True)[0].shape[-2:]
              for i in range(40)]
    turned = sum(s == (12, 8) for s in shapes)
    assert 8 <= turned <= 32 and turned + sum(s == (8, 12) for s in shapes) == 40
    plain = source.train_batch(tuples, model, torch.Generator().manual_seed(0), (0.1, 0.1), False)[0]
    assert plain.shape[-2:] == (8, 12)
    model.fixed_frame = True  # an encoder built for one frame size (Swin-like)
    assert all(source.train_batch(tuples, model, torch.Generator(), (0.1, 0.1), True)[0].shape[-2:] == (8, 12)
               for _ in range(10))


def test_an_epoch_shows_each_training_image_about_once_on_complete_and_incomplete_patients(demo_index):
    """tuples_per_epoch against its oracle, the images that drawn tuples hold (training_tuples,
    no magnification dropout): about one presentation per training image. On complete patients
    that is images / magnifications, as before; with half the patients missing 100X and 400X it
    takes more tuples, where images / magnifications would show each image ~0.8 times."""
    from config import Config
    from preprocess.dataset import patient_images, training_tuples, tuples_per_epoch

    cfg = Config()
    patients = demo_index["patient"].unique()
    incomplete = demo_index["patient"].isin(patients[::2]) & demo_index["mag"].isin([100, 400])
    for usable, complete in ((np.ones(len(demo_index), bool), True), (~incomplete.to_numpy(), False)):
        data = patient_images(demo_index, usable, patients, cfg.magnifications, cfg.sample_mode)
        images = int(usable.sum())
        count = tuples_per_epoch(data, cfg)
        tuples, _ = training_tuples(data, 200 * count, np.random.default_rng(0))
        shown = (tuples >= 0).sum() / 200  # presentations per epoch, averaged over 200 epochs' draws
        assert abs(shown / images - 1) < 0.03, (complete, shown, images)
        assert (count == images // 4) == complete
