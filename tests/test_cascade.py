"""Cascade semantics as pure functions: parsing, validation, per-stage selection and the final merged ranking."""

from __future__ import annotations

import pytest

from kalm_batch.cascade import (
    CascadeError,
    Placed,
    Scored,
    Stage,
    final_ranking,
    parse_cascade,
    plan_stages,
    select_top,
    stage_order,
    validate_stages,
)

RATIOS = [4, 8, 16, 32]  # a store pooled at r0 = 4


def test_parse_cascade():
    assert parse_cascade("32:100,4:20") == [Stage(32, 100), Stage(4, 20)]
    assert parse_cascade(" 16:50 , 8:10 ,4:3") == [Stage(16, 50), Stage(8, 10), Stage(4, 3)]
    assert parse_cascade("4:7") == [Stage(4, 7)]


@pytest.mark.parametrize("spec, words", [
    ("32-100", "stage 1 is '32-100'"), ("32:100,4", "stage 2 is '4'"), ("a:1", "RATIO:K"), ("", "stage 1"),
])
def test_parse_cascade_rejects_malformed(spec, words):
    with pytest.raises(CascadeError, match=words):
        parse_cascade(spec)


@pytest.mark.parametrize("spec, words", [
    ("32:100,4:100", "K strictly decreasing"),
    ("32:20,4:50", "stage 2 keeps K=50 but stage 1 keeps K=20"),
    ("2:100,4:20", "stage 1 ratio 2 cannot be served.*\\[4, 8, 16, 32\\].*r0=4"),
    ("32:100,6:20", "stage 2 ratio 6"),
    ("32:0", "K must be >= 1"),
])
def test_validate_rejects(spec, words):
    with pytest.raises(CascadeError, match=words):
        validate_stages(parse_cascade(spec), RATIOS, spec)


def test_plan_stages_single_stage_defaults_to_r0_and_top_100():
    assert plan_stages(ratios=RATIOS) == [Stage(4, 100)]
    assert plan_stages(ratios=RATIOS, ratio=16, top_k=30) == [Stage(16, 30)]
    with pytest.raises(CascadeError, match="--ratio 2 cannot be served"):
        plan_stages(ratios=RATIOS, ratio=2)


def test_plan_stages_cascade_rules():
    assert plan_stages(ratios=RATIOS, cascade="32:100,4:20") == [Stage(32, 100), Stage(4, 20)]
    assert plan_stages(ratios=RATIOS, cascade="32:100,4:20", top_k=200) == [Stage(32, 100), Stage(4, 20)]
    with pytest.raises(CascadeError, match="drop --ratio"):
        plan_stages(ratios=RATIOS, cascade="32:100,4:20", ratio=4)
    with pytest.raises(CascadeError, match="--top-k 50 keeps fewer candidates.*K1=100"):
        plan_stages(ratios=RATIOS, cascade="32:100,4:20", top_k=50)


def _s(doc, p, rank, margin=None):
    return Scored(doc, p, p * 10 if margin is None else margin, rank)


def test_stage_order_breaks_ties_by_margin_then_first_stage_rank():
    items = [_s("a", 0.5, 3), _s("b", 0.9, 5), _s("c", 0.5, 1), _s("d", 1.0, 9, margin=20.0),
             _s("e", 1.0, 8, margin=30.0)]
    assert [s.doc_id for s in stage_order(items)] == ["e", "d", "b", "c", "a"]


def test_final_ranking_hand_made_cascade():
    # stage 1 (coarse) scored five candidates of q1 and two of q2; stage 2 rescored the top 3 / top 1 of those.
    stage1 = {"q1": [_s("d1", 0.9, 1), _s("d2", 0.2, 2), _s("d3", 0.8, 3), _s("d4", 0.7, 4), _s("d5", 0.1, 5)],
              "q2": [_s("x", 0.3, 1), _s("y", 0.6, 2)]}
    top = select_top(stage1, 3)
    assert [s.doc_id for s in top["q1"]] == ["d1", "d3", "d4"] and [s.doc_id for s in top["q2"]] == ["y", "x"]
    # the finer stage disagrees with the coarse one: d4 best, then d1, then d3
    stage2 = {"q1": [_s("d1", 0.5, 1), _s("d3", 0.4, 3), _s("d4", 0.95, 4)], "q2": [_s("y", 0.05, 2)]}
    ranking = final_ranking([stage1, stage2])
    assert [(p.scored.doc_id, p.stage, p.rank) for p in ranking["q1"]] == [
        ("d4", 2, 1), ("d1", 2, 2), ("d3", 2, 3), ("d2", 1, 4), ("d5", 1, 5)]
    # a low stage-2 score still ranks above every candidate stage 2 did not see
    assert [(p.scored.doc_id, p.stage) for p in ranking["q2"]] == [("y", 2), ("x", 1)]
    scores = [p.run_score for p in ranking["q2"]]
    assert scores == [1.05, 0.3] and scores == sorted(scores, reverse=True)
    assert ranking["q1"][0].scored.p_yes == 0.95  # the placing stage's own score is kept


def test_final_ranking_three_stages_and_a_dropped_pair():
    s1 = {"q": [_s(d, p, i) for i, (d, p) in enumerate([("a", .1), ("b", .9), ("c", .8), ("d", .7)], start=1)]}
    s2 = {"q": [_s("b", .2, 2), _s("c", .6, 3)]}  # "d" was selected but failed in stage 2 (e.g. corrupt): stays
    s3 = {"q": [_s("c", .3, 3)]}
    placed = final_ranking([s1, s2, s3])["q"]
    assert [(p.scored.doc_id, p.stage) for p in placed] == [("c", 3), ("b", 2), ("d", 1), ("a", 1)]
    assert [p.rank for p in placed] == [1, 2, 3, 4]
    assert isinstance(placed[0], Placed) and placed[0].run_score == pytest.approx(2.3)


def test_single_stage_run_score_is_p_yes():
    placed = final_ranking([{"q": [_s("a", 0.25, 1), _s("b", 0.75, 2)]}])["q"]
    assert [(p.scored.doc_id, p.run_score) for p in placed] == [("b", 0.75), ("a", 0.25)]
