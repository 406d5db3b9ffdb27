"""The toy Krea 2: its world (deterministic, held-out pairs never trained on), the reader that scores images against
scenes, the committed weights loaded through the real loaders, prompt following, and the training script."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from krea_sweeps.toy import world
from krea_sweeps.toy.evaluate import accuracy, read_scene, score


# ---------------------------------------------------------------------------------------------------------- world
def test_scenes_are_deterministic_from_the_seed_and_differ_across_seeds():
    a, b, c = world.draw_scenes(3, 50), world.draw_scenes(3, 50), world.draw_scenes(4, 50)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(x.render(), y.render()) for x, y in zip(a, b))
    assert [s.caption for s in a] != [s.caption for s in c]


def test_training_draws_never_contain_a_held_out_pair_and_held_out_draws_always_do():
    train = world.draw_scenes(0, 2000, "train")
    assert not any(world.is_held_out(o.colour, o.shape) for s in train for o in s.objects)
    assert any(len(s.objects) == 2 for s in train) and any(len(s.objects) == 1 for s in train)
    held = world.draw_scenes(0, 200, "heldout")
    assert all(len(s.objects) == 1 and world.is_held_out(s.objects[0].colour, s.objects[0].shape) for s in held)
    assert {(o.colour, o.shape) for s in held for o in s.objects} == set(world.HELD_OUT)


def test_masks_are_the_pixels_painted_in_each_objects_colour():
    for scene in world.draw_scenes(1, 100):
        image, masks = scene.render(), scene.masks()
        assert masks.shape == (len(scene.objects), 64, 64) and masks.any(axis=(1, 2)).all()
        assert not (masks.sum(0) > 1).any()  # visible pixels belong to one object
        for obj, mask in zip(scene.objects, masks):
            assert (image[mask] == world.COLOURS[obj.colour]).all()
        assert (image[~masks.any(0)] == world.BACKGROUNDS[scene.background]).all()


def test_captions_parse_back_to_their_scene_and_other_text_does_not():
    for scene in world.draw_scenes(2, 100):
        parsed = world.parse_caption(scene.caption)
        assert parsed.caption == scene.caption
        assert [(o.shape, o.colour, o.size, o.position) for o in parsed.objects] == \
               [(o.shape, o.colour, o.size, o.position) for o in scene.objects]
    assert world.parse_caption("A red fox sitting in fresh snow.") is None
    assert world.parse_caption("a huge red circle on the left on a white background") is None


def test_world_prompts_give_scenes_to_world_captions_only(tmp_path):
    from krea_sweeps.errors import ConfigError

    prompts = world.WorldPrompts(prompts=["a red fox", "a small red circle on the left on a white background"])
    truth = prompts.ground_truth(tmp_path / "arrays")
    assert truth[0] is None and truth[1]["objects"][0]["colour"] == "red"
    assert np.array_equal(np.load(tmp_path / truth[1]["masks"]), prompts.scenes()[1].masks())
    with pytest.raises(ConfigError, match="prompts.prompts"):
        world.WorldPrompts(prompts=[])


# --------------------------------------------------------------------------------------------------------- reader
def test_reader_scores_ground_truth_renders_perfectly_and_a_blank_image_not_at_all():
    scenes = world.all_single_object_scenes("heldout") + world.draw_scenes(5, 100)
    assert set(accuracy([score(read_scene(s.render(), s), s) for s in scenes]).values()) == {1.0}
    blank = np.full((64, 64, 3), 0.5, np.float32)
    assert not any(score(read_scene(blank, s), s)["colour+position"] for s in scenes[:20])


def test_reader_sees_a_moved_or_recoloured_object():
    scene = world.parse_caption("a large red circle on the left on a white background")
    moved = world.parse_caption("a large red circle on the right on a white background")
    recoloured = world.parse_caption("a large blue circle on the left on a white background")
    # Colour is read inside the scene's mask (now background), position and size from the object's own pixels.
    assert score(read_scene(moved.render(), scene), scene) == {"colour": False, "position": False, "size": True,
                                                              "background": True, "colour+position": False}
    assert not score(read_scene(recoloured.render(), scene), scene)["colour"]


# ---------------------------------------------------------------------------------------------------- weights
def test_committed_weights_match_their_manifest():
    from krea_sweeps.toy.checkpoints import WEIGHTS_DIR, manifest

    info = manifest()
    for name, digest in info["files"].items():
        assert hashlib.sha256((WEIGHTS_DIR / name).read_bytes()).hexdigest() == digest, name
    combined = hashlib.sha256(json.dumps(info["files"], sort_keys=True).encode()).hexdigest()
    assert info["weights_sha256"] == combined


def test_toy_loads_through_the_single_file_loader_with_the_published_projectors(toy_turbo, toy_raw):
    from krea_sweeps.synthetic import projector_values
    from krea_sweeps.toy.checkpoints import ToyWeights

    assert toy_turbo.sources.transformer.endswith("krea2_turbo.safetensors")
    assert ToyWeights().version in toy_turbo.sources.transformer
    for model, name in ((toy_turbo, "turbo"), (toy_raw, "raw")):
        weight = model.transformer.text_fusion.projector.weight
        assert torch.equal(weight, torch.tensor(projector_values()[name]).view(1, 12))  # frozen during training
    assert toy_turbo.transformer.config.num_layers == 3  # the toy's own sizes, not the random model's


def test_toy_turbo_follows_held_out_captions_and_prompts_move_images_beyond_seed_noise(toy_turbo):
    """Through Krea2Pipeline on the six held-out (colour, shape) pairs, never seen in training: the named background
    and position are drawn, and the named colour in the object's mask for all but at most one (the evaluator's 90
    captions give the full numbers: docs/toy.md); changing the prompt changes the image far more than the seed."""
    from krea_sweeps.prompts import encode
    from krea_sweeps.sampler import Denoising, Sampler, generate

    pipe = toy_turbo.pipeline()
    sampler = Sampler(max_sequence_length=48).resolved(toy_turbo.variant)
    layers = tuple(toy_turbo.variant.select_layers)
    neg = encode(toy_turbo.tokenizer, toy_turbo.text_encoder, [""], 48, layers)
    positions = ("left", "right", "top", "bottom", "centre", "left")
    scenes = [world.Scene((world.Obj(shape, colour, "large", position),), list(world.BACKGROUNDS)[i % 3])
              for i, ((colour, shape), position) in enumerate(zip(world.HELD_OUT, positions))]
    images = {}
    for i, scene in enumerate(scenes):
        cond = encode(toy_turbo.tokenizer, toy_turbo.text_encoder, [scene.caption], 48, layers)
        for seed in (0, 1):
            images[i, seed] = generate(pipe, sampler, cond, neg, seed=seed, denoising=Denoising())
    scores = [score(read_scene(images[i, 0], s), s) for i, s in enumerate(scenes)]
    assert all(s["background"] and s["position"] for s in scores), scores
    assert sum(s["colour"] for s in scores) >= len(scenes) - 1, scores
    seed_noise = np.mean([np.abs(images[i, 0] - images[i, 1]).mean() for i in range(len(scenes))])
    prompt_change = np.mean([np.abs(images[i, 0] - images[j, 0]).mean() for i in range(3) for j in range(i)])
    assert prompt_change > 3 * seed_noise, (prompt_change, seed_noise)


def test_bad_recipe_values_stop_before_training_with_the_key_named(tmp_path):
    """`--set` with a value of the wrong type, or no teacher substeps, fails in one line naming the key and writes
    nothing (0 substeps would silently train Turbo towards a zero velocity)."""
    from krea_sweeps.toy.train import main, train

    with pytest.raises(SystemExit, match="turbo_substeps=four: not a int"):
        main(["--out", str(tmp_path / "a"), "--set", "turbo_substeps=four"])
    with pytest.raises(ValueError, match="turbo_substeps=0: .*at least 1"):
        train(tmp_path / "b", {"turbo_substeps": 0})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_evaluator_builds_each_intervention_as_run_py_composes_it():
    """The evaluator's interventions come from `intervention=<name>` composed with its schema (a preset file read
    raw has a `defaults` list that is no field), with the overrides applied."""
    from krea_sweeps.toy.evaluate import INTERVENTIONS, build_intervention

    built = {label: build_intervention(name, overrides) for label, (name, overrides) in INTERVENTIONS.items()}
    assert built["solo L20"].slot == 6 and built["leave_one_out L20"].slot == 6
    assert built["knockout L20"].keys == [6]
    assert built["rebalance deep_boost"].gains[8] == 5.0


# ---------------------------------------------------------------------------------------------------- training
def test_training_is_deterministic_and_writes_loadable_weights(tmp_path):
    """A few steps of each stage twice: the same bytes (hash) both times, and a manifest that names them."""
    from krea_sweeps.toy.train import train

    tiny = dict(scenes=48, vae_steps=2, vae_batch=4, dit_steps=2, dit_batch=8, turbo_steps=1)
    a = train(tmp_path / "a", tiny)
    b = train(tmp_path / "b", tiny)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["recipe"]["dit_steps"] == 2
    from krea_sweeps.toy.train import RECIPE

    assert RECIPE["dit_steps"] != 2  # the overrides did not leak into the module's recipe
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "toy_turbo.safetensors"), framework="pt") as f:
        assert "txtfusion.projector.weight" in f.keys()  # the original single-file naming


# ------------------------------------------------------------------------------------------------ ground truth
def test_word_map_scores_against_masks_on_maps_with_known_answers():
    from krea_sweeps.toy.ground_truth import mask_iou, pointing_game, score_word_maps

    scene = world.parse_caption("a large red circle on the left and a small blue square on the right on a white "
                                "background")
    masks = scene.masks()
    perfect = masks[0].astype(float)  # the object's own mask as a map
    assert pointing_game(perfect, masks[0]) and mask_iou(perfect, masks[0]) == 1.0
    wrong = masks[1].astype(float)
    assert not pointing_game(wrong, masks[0]) and mask_iou(wrong, masks[0]) == 0.0
    left_column = np.zeros((4, 4))
    left_column[:, 0] = 1.0  # a 4×4 token map whose left column lights up: 16-pixel blocks
    scores = score_word_maps({"red": left_column, "square": left_column, "a": left_column}, scene)
    assert set(scores) == {"red", "square"}  # 'a' names no object
    assert scores["red"]["pointing"] and not scores["square"]["pointing"]
    assert 0 < scores["red"]["iou"] < 1


def shuffled_scores(heatmap: np.ndarray, mask: np.ndarray, rng: np.random.Generator, draws: int = 100):
    """Chance level for this mask: pointing game and mask IoU of the same map values on randomly permuted cells."""
    from krea_sweeps.toy.ground_truth import mask_iou, pointing_game

    perms = [rng.permutation(heatmap.ravel()).reshape(heatmap.shape) for _ in range(draws)]
    return np.mean([pointing_game(m, mask) for m in perms]), np.mean([mask_iou(m, mask) for m in perms])


def test_word_and_concept_maps_on_the_toy_score_against_the_scenes_and_beat_shuffled_maps(
        session, tmp_path, monkeypatch):
    """Toy-world prompts on the trained toy: word_maps and concept_maps report pointing-game accuracy and mask IoU
    against the scenes' masks (recomputed here from the saved maps and masks), and the object words' maps point at
    their object more often, and overlap it more, than the same maps with their cells shuffled (chance)."""
    from conftest import compose

    from krea_sweeps.plan import plan
    from krea_sweeps.task import execute
    from krea_sweeps.toy.ground_truth import mask_iou, pointing_game

    monkeypatch.chdir(tmp_path)
    captions = [s.caption for s in world.all_single_object_scenes("heldout")[::7][:12]]  # shapes, places, colours
    job = plan(compose(["wandb.mode=disabled", "model/synthetic_weights=toy", "prompts=toy",
                        f"prompts.prompts=[{','.join(captions)}]", "metrics=[word_maps,concept_maps]",
                        "metrics.word_maps.compare_stock=false",
                        "metrics.concept_maps.concepts=[circle,square,triangle,background]"]))
    keys = job.metrics[0].summary_keys(job) + job.metrics[1].summary_keys(job)
    assert {"word_maps/pointing", "word_maps/mask_iou", "concept_maps/pointing", "concept_maps/mask_iou"} <= set(keys)
    record = execute(job, session).record
    arrays = tmp_path / "outputs" / "adhoc" / "arrays"
    rng = np.random.default_rng(0)
    hits, ious, chance = [], [], []
    for p, scene in enumerate(job.prompt_set.scenes()):
        masks = np.load(arrays / f"scenes.masks_p{p:02d}.npy")
        assert np.array_equal(masks, scene.masks())
        words = [str(w) for w in np.load(arrays / f"word_maps.p{p:02d}.words.npy")]
        grid = np.load(arrays / f"word_maps.p{p:02d}_s0.grid.npy")
        assert grid.shape[1:] == (4, 4)  # the toy's ×8 VAE and 2×2 patches: 4×4 image tokens at 64²
        o = scene.objects[0]
        for word in (o.size, o.colour, o.shape):
            heatmap = grid[words.index(word)]
            hits.append(pointing_game(heatmap, masks[0]))
            ious.append(mask_iou(heatmap, masks[0]))
            chance.append(shuffled_scores(heatmap, masks[0], rng))
    summary = record["summary"]
    assert summary["word_maps/pointing"] == pytest.approx(np.mean(hits))  # the metric's numbers are these
    assert summary["word_maps/mask_iou"] == pytest.approx(np.mean(ious))
    assert 0.0 <= summary["concept_maps/pointing"] <= 1.0
    chance_pointing, chance_iou = np.mean(chance, axis=0)
    assert np.mean(hits) > chance_pointing + 0.1, (np.mean(hits), chance_pointing)
    assert np.mean(ious) > 2 * chance_iou, (np.mean(ious), chance_iou)
