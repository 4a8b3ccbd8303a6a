"""Attention transfer on sequences longer than the prepared chunks (`variants.*.transfer_seq_len`)."""
import pytest
import torch

from pipeline.config import AttentionTransferConfig, CacheTeacherAttnConfig, HybridConfig, check_params
from pipeline.hybrid import linearize
from pipeline.params import ConfigError
from pipeline.teacher import load_teacher
from pipeline.teacher_states import TeacherStates, write_teacher_states
from pipeline.transfer import train_block
from pipeline.params import read_params
from tests.conftest import REPO

CHUNK, LAYERS = 128, 5  # the shared `data` fixture's chunks; stories260K's layers
TRANSFER = AttentionTransferConfig(epochs=1, grad_accum=1, eval_every=1)


@pytest.fixture(scope="module")
def joint_states(stories_path, data, tmp_path_factory):
    """A disk cache whose one block spans every layer: its input is the token embedding."""
    folder = tmp_path_factory.mktemp("joint")
    write_teacher_states(load_teacher(str(stories_path)), data, CacheTeacherAttnConfig(block_size=LAYERS), folder)
    return TeacherStates.open(folder)


def test_joined_sequences_are_the_embeddings_of_consecutive_chunks(stories_path, data, joint_states):
    joined = joint_states.with_seq_len(2 * CHUNK, max_positions=512)
    assert (joined.seq_len, joined.num_chunks("train"), joined.num_chunks("validation")) == (256, 3, 1)
    ids = torch.tensor(data["train"][2]["input_ids"] + data["train"][3]["input_ids"])
    with torch.no_grad():
        expected = load_teacher(str(stories_path)).get_input_embeddings()(ids)[None]
    read = joined.read(0, "train", [1])
    assert read.shape == (1, 256, 64)
    assert torch.equal(read, expected.to(read.dtype))  # bf16 storage of the same values: bitwise
    online = TeacherStates(joint_states.folder, dict(joint_states.manifest, mode="online"), data,
                           load_teacher(str(stories_path)).get_input_embeddings()).with_seq_len(256, 512)
    assert torch.equal(online.read(0, "train", [1]), expected)
    assert joint_states.with_seq_len(None, 512) is joint_states and joint_states.with_seq_len(CHUNK, 512) is joint_states


def test_transfer_on_joined_sequences_sees_the_longer_context(stories_path, joint_states, tmp_path):
    """The teacher's attention over 256 tokens is not two 128-token ones: the initial loss differs,
    and training on the joined sequences still lowers every layer's MSE."""
    attention = HybridConfig(window_size=16)
    short = train_block(0, joint_states, linearize(load_teacher(str(stories_path)), attention), TRANSFER,
                        tmp_path / "short.pt", lambda m, s: None)
    long = train_block(0, joint_states.with_seq_len(256, 512), linearize(load_teacher(str(stories_path)), attention),
                       TRANSFER, tmp_path / "long.pt", lambda m, s: None)
    assert long.fit.items_seen == 3 and short.fit.items_seen == 6  # one epoch: the same tokens
    assert long.fit.initial["loss"] != pytest.approx(short.fit.initial["loss"], rel=1e-3)
    assert all(long.mse_after[i] < long.mse_before[i] for i in long.layers)


def test_joining_is_refused_where_it_would_not_be_exact_or_cannot_fit(stories_path, data, joint_states, tmp_path):
    per_layer = tmp_path / "per_layer"
    write_teacher_states(load_teacher(str(stories_path)), data, CacheTeacherAttnConfig(block_size=1), per_layer)
    with pytest.raises(ConfigError, match=r"^variants.\*.transfer_seq_len: .* needs every layer in one transfer "
                                          r"block.*states: online, or a block_size of at least the teacher's 5"):
        TeacherStates.open(per_layer).with_seq_len(256, 512)
    with pytest.raises(ConfigError, match=r"1024 tokens exceed the teacher's 512 positions"):
        joint_states.with_seq_len(1024, 512)
    with pytest.raises(ConfigError, match=r"768 tokens join 6 chunks, but the validation split has only 2"):
        joint_states.with_seq_len(768, 1024)


def test_check_params_names_a_transfer_seq_len_that_does_not_join_whole_chunks():
    params = read_params(REPO / "params.yaml")
    params["variants"]["lolcats_long"] = {"transfer_seq_len": 1500}
    with pytest.raises(ConfigError, match=r"^variants.lolcats_long.transfer_seq_len: must be a multiple of "
                                          r"prepare-data.seq_len \(1024\).*got 1500"):
        check_params(params)
    params["variants"]["lolcats_long"] = {"transfer_seq_len": 4096, "transfer": False}
    with pytest.raises(ConfigError, match=r"transfer_seq_len: is read by attention-transfer"):
        check_params(params)
    params["variants"]["lolcats_long"] = {"transfer_seq_len": 4096}
    assert "variants" in check_params(params)
