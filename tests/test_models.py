"""Model tests: parameter counts of the paper's encoders, shapes, transformer options, transfer."""

from __future__ import annotations

import pytest
import torch
from presets import encoder_state, preset, tiny_model

from avsa.config import compose
from avsa.errors import CheckpointError, ConfigError
from avsa.losses import avsa_objective
from avsa.models import AudioEncoder, AVSANet, VideoEncoder, ViewpointTransformer, build_model
from avsa.models.transformer import direction_features


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_batch(b=2, v=3, t=4, s=32, f=32, m=32, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    video = torch.rand(b, v, 3, t, s, s, generator=gen)
    audio = torch.randn(b, v, 4, f, m, generator=gen)
    directions = torch.rand(b, v, 2, generator=gen) * 2 - 1
    return video, audio, directions


def test_full_encoder_parameter_counts_match_paper():
    assert n_params(VideoEncoder(64)) == pytest.approx(15.4e6, rel=0.05)
    assert n_params(AudioEncoder(64)) == pytest.approx(4.7e6, rel=0.05)


@torch.no_grad()
def test_full_video_encoder_last_map_is_512x1x7x7():
    enc = VideoEncoder(64).eval()
    x = torch.rand(1, 3, 8, 112, 112)
    assert enc.feature_map(x).shape == (1, 512, 1, 7, 7)
    assert enc(x).shape == (1, 512)


@torch.no_grad()
def test_full_audio_encoder_output():
    enc = AudioEncoder(64).eval()
    x = torch.randn(1, 4, 100, 128)
    assert enc.feature_map(x).shape == (1, 512, 13, 16)
    assert enc(x).shape == (1, 512)


def test_encoder_output_is_global_max_of_last_map():
    enc = VideoEncoder(8).eval()
    x = torch.rand(2, 3, 4, 32, 32)
    with torch.no_grad():
        fmap = enc.feature_map(x)
        assert torch.equal(enc(x), fmap.flatten(2).max(dim=2).values)


@torch.no_grad()
def test_audio_pool_is_max_for_the_paper_and_mean_for_tiny():
    x = torch.randn(2, 4, 32, 32)
    for name, reduce in (("full", torch.amax), ("tiny", torch.mean)):
        m = preset(name)
        enc = build_model(m).audio_encoder.eval()
        assert torch.allclose(enc(x), reduce(enc.feature_map(x), dim=(2, 3))), name
    with pytest.raises(ConfigError, match="audio_pool"):
        compose(["model.audio_pool=median"])
    with pytest.raises(ValueError, match="pool='median'"):
        AudioEncoder(8, pool="median")


def test_tiny_forward_shapes_and_heads():
    model = tiny_model()
    video, audio, _ = tiny_batch()
    out = model(video, audio)
    d = 8 * preset("tiny").video_width
    assert out["video_feat"].shape == (2, 3, d) and out["audio_feat"].shape == (2, 3, d)
    for key in ("video_target", "audio_target", "video_pred", "audio_pred"):
        assert out[key].shape == (2, 3, preset("tiny").embed_dim), key
    heads = [model.video_head, model.audio_head, model.video_pred_head, model.audio_pred_head]
    assert all(isinstance(h, torch.nn.Linear) for h in heads)
    assert torch.allclose(out["video_target"], model.video_head(out["video_feat"]))


def test_predictions_come_from_the_other_modality():
    model = tiny_model().eval()
    video, audio, _ = tiny_batch()
    with torch.no_grad():
        out = model(video, audio)
        out2 = model(video + 1.0, audio)  # change only the video
    assert torch.allclose(out["video_pred"], out2["video_pred"])  # made from audio
    assert not torch.allclose(out["audio_pred"], out2["audio_pred"])  # made from video
    assert not torch.allclose(out["video_target"], out2["video_target"])


def test_without_transformer_predictions_are_heads_of_features():
    model = tiny_model(use_transformer=False).eval()
    assert model.video_transformer is None and model.audio_transformer is None
    video, audio, _ = tiny_batch(v=1)
    with torch.no_grad():
        out = model(video, audio)
    assert torch.allclose(out["video_pred"], model.video_pred_head(out["audio_feat"]))
    assert torch.allclose(out["audio_pred"], model.audio_pred_head(out["video_feat"]))


def test_transformer_defaults_are_equivariant_and_nonnegative():
    tr = ViewpointTransformer(16).eval()
    assert len(tr.layers) == 2 and tr.pos_enc is None
    layer = tr.layers[0]
    assert layer.self_attn.num_heads == 1 and layer.linear1.out_features == 64
    assert not layer.norm_first
    x = torch.randn(2, 4, 16)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        y = tr(x)
        assert torch.allclose(tr(x[:, perm]), y[:, perm], atol=1e-5)
        assert torch.equal(tr(x, torch.randn(2, 4, 2)), y)  # directions ignored by default
    assert (y >= 0).all()  # ReLU after each layer


def test_spherical_positional_encoding_uses_directions():
    tr = ViewpointTransformer(16, heads=4, spherical_pos_enc=True).eval()
    x = torch.randn(2, 4, 16)
    d1 = torch.rand(2, 4, 2)
    with torch.no_grad():
        y1, y2 = tr(x, d1), tr(x, d1 + 0.5)
    assert not torch.allclose(y1, y2)
    with pytest.raises(ValueError, match="directions"):
        tr(x)


def test_direction_features_follow_the_axis_convention():
    az_el = torch.tensor([[0.0, 0.0], [torch.pi / 2, 0.0], [0.0, torch.pi / 2]])
    unit = direction_features(az_el, n_freqs=2)[:, :3]
    torch.testing.assert_close(unit, torch.eye(3), atol=1e-6, rtol=0)  # front, left, up
    # az = +pi and -pi are the same direction
    feats = direction_features(torch.tensor([[torch.pi, 0.3], [-torch.pi, 0.3]]), n_freqs=3)
    torch.testing.assert_close(feats[0], feats[1], atol=1e-5, rtol=0)


def test_model_with_positional_encoding_needs_and_uses_directions():
    model = tiny_model(spherical_pos_enc=True, transformer_heads=2).eval()
    video, audio, directions = tiny_batch()
    with torch.no_grad():
        a = model(video, audio, directions)["video_pred"]
        b = model(video, audio, directions.flip(1))["video_pred"]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError):
        model(video, audio)


def test_encoder_transfer_keeps_heads_fresh():
    torch.manual_seed(0)
    src = tiny_model()
    torch.manual_seed(1)
    dst = tiny_model()
    dst.load_encoders(src.state_dict())  # as pretraining's init loads a full checkpoint
    state = encoder_state(src)
    assert state
    for k, v in state.items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert not torch.equal(dst.video_head.weight, src.video_head.weight)
    assert not torch.equal(
        dst.video_transformer.layers[0].linear1.weight,
        src.video_transformer.layers[0].linear1.weight,
    )


def test_load_encoders_rejects_mismatched_state():
    model = tiny_model()
    state = tiny_model(video_width=16).state_dict()
    with pytest.raises(CheckpointError, match="video_encoder") as err:
        model.load_encoders(state)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError):
        model.load_encoders({})


def test_presets_and_bad_config():
    full, tiny = preset("full"), preset("tiny")
    assert full.video_width == 64 and full.transformer_heads == 1 and full.name == "full"
    assert (tiny.name, tiny.video_width, tiny.embed_dim, tiny.transformer_dropout) == \
        ("tiny", 8, 32, 0.0)
    assert isinstance(build_model(tiny), AVSANet)
    assert build_model(tiny, audio_channels=1).audio_encoder.body[0].in_channels == 1
    with pytest.raises(ConfigError, match=r"model"):
        compose(["model=huge"])
    with pytest.raises(ConfigError, match=r"model\.depth"):
        compose(["model=tiny", "model.depth=3"])


def test_full_model_builds_with_paper_sizes():
    model = build_model(preset("full"))
    assert model.video_dim == 512 and model.audio_dim == 512 and model.embed_dim == 128
    assert model.video_transformer.layers[0].linear1.out_features == 2048


def test_loss_gradients_reach_all_trained_parts():
    model = tiny_model()
    video, audio, _ = tiny_batch()
    loss, metrics = avsa_objective(model(video, audio), temperature=0.07)
    loss.backward()
    parts = [model.video_encoder, model.audio_encoder, model.video_transformer]
    parts += [model.audio_transformer, model.video_pred_head, model.audio_head]
    for part in parts:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert 0.0 <= metrics["avsa_acc"].item() <= 1.0
