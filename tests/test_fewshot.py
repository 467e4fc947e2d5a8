"""Few-shot classifiers (tlkit.fewshot) and the ``tlkit fewshot`` command."""

import pytest
import torch
from torchvision.io import write_png

from tlkit.cli import main
from tlkit.features import FeatureSet
from tlkit.fewshot import (
    KNearestNeighbors,
    NearestClassMean,
    few_shot_accuracy,
    format_table,
    make_classifier,
    sample_shots,
)


def test_nearest_class_mean_compares_directions_not_lengths():
    support = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.3, 1.0]])
    ncm = NearestClassMean().fit(support, torch.tensor([3, 3, 7, 7]))
    # only directions count: a long [5, 3] is class 3, a short [0.1, 0.2] class 7; rescaled support changes nothing
    assert ncm.predict(torch.tensor([[5.0, 3.0], [0.1, 0.2]])).tolist() == [3, 7]
    assert ncm.scores(torch.tensor([[2.0, 0.0]])).shape == (1, 2)
    scaled = NearestClassMean().fit(support * torch.tensor([[10.0], [0.1], [3.0], [1.0]]), torch.tensor([3, 3, 7, 7]))
    query = torch.randn(20, 2)
    assert torch.equal(
        scaled.predict(query), NearestClassMean().fit(_unit(support), torch.tensor([3, 3, 7, 7])).predict(query)
    )


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_knn_takes_the_majority_of_the_k_nearest():
    # the query's nearest is class 1, but the next two (k=3) are class 0
    support = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1])
    query = torch.tensor([[1.0, 0.2]])
    assert KNearestNeighbors(k=1).fit(support, labels).predict(query).tolist() == [1]
    assert KNearestNeighbors(k=3).fit(support, labels).predict(query).tolist() == [0]


def test_knn_breaks_a_tied_vote_by_summed_similarity_and_caps_k_at_the_support_set():
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # one image per class: every vote ties at k=2
    knn = KNearestNeighbors(k=5).fit(support, torch.tensor([4, 9]))  # k > support set: all of it votes
    assert knn.predict(torch.tensor([[0.9, 0.2], [0.1, 0.8]])).tolist() == [4, 9]


def test_knn_and_ncm_reject_bad_arguments():
    with pytest.raises(ValueError, match="k >= 1"):
        KNearestNeighbors(k=0)
    with pytest.raises(ValueError, match="one label per feature row"):
        NearestClassMean().fit(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labelled rows"):
        KNearestNeighbors().fit(torch.zeros(2, 2), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="Unknown few-shot classifier 'svm'.*ncm, knn"):
        make_classifier("svm")


def test_sample_shots_draws_n_per_class_seeded_and_never_an_unlabelled_row():
    labels = torch.tensor([0] * 6 + [1] * 4 + [-1] * 5 + [2] * 3)
    rows = sample_shots(labels, 3, seed=0)
    assert sorted(labels[rows].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(set(rows.tolist())) == 9
    assert torch.equal(rows, sample_shots(labels, 3, seed=0))
    assert any(not torch.equal(sample_shots(labels, 3, seed=s), rows) for s in range(1, 5))
    with pytest.raises(ValueError, match="4 shots per class asked, but 'cat' has only 3 labelled train images"):
        sample_shots(labels, 4, seed=0, class_names=["dog", "bird", "cat"])
    with pytest.raises(ValueError, match="at least 1"):
        sample_shots(labels, 0, seed=0)


def _clusters(n_per_class: int, seed: int, unlabelled: int = 0) -> FeatureSet:
    """Three classes pointing in three directions of 8-D space, with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:3] * 5
    labels = torch.arange(3).repeat_interleave(n_per_class)
    features = centres[labels] + 0.5 * torch.randn(len(labels), 8, generator=gen)
    labels = torch.cat([labels, torch.full((unlabelled,), -1)])
    features = torch.cat([features, torch.randn(unlabelled, 8, generator=gen)])
    return FeatureSet({"features": features}, labels, [f"img/{i}" for i in range(len(labels))])


def test_few_shot_accuracy_scores_each_classifier_on_the_same_draws():
    train, test = _clusters(10, seed=0), _clusters(20, seed=1, unlabelled=4)  # unlabelled test rows are not scored
    results = few_shot_accuracy(train, test, shots=[1, 5], seeds=3)
    assert [(r.classifier, r.shots) for r in results] == [("ncm", 1), ("knn", 1), ("ncm", 5), ("knn", 5)]
    assert all(len(r.accuracies) == 3 and r.mean == 1.0 and r.std == 0.0 for r in results)
    # with one shot, k-NN (all votes tie) and nearest class mean are the same classifier
    assert results[0].accuracies == results[1].accuracies
    table = format_table(results)
    assert "| 1 | 1.000 ± 0.000 | 1.000 ± 0.000 |" in table and "3 draws" in table
    with pytest.raises(ValueError, match="no labelled rows"):
        few_shot_accuracy(train, _clusters(0, seed=2, unlabelled=3))


def test_few_shot_accuracy_tells_chance_from_signal():
    train, test = _clusters(10, seed=0), _clusters(20, seed=1)
    noise = FeatureSet({"features": torch.randn(30, 8)}, train.labels, train.ids)
    learned = few_shot_accuracy(train, test, shots=[5], classifiers=["ncm"], seeds=4)[0].mean
    chance = few_shot_accuracy(noise, test, shots=[5], classifiers=["ncm"], seeds=4)[0].mean
    assert learned == 1.0 and chance < 0.8


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """Two classes of 6 small PNGs whose colour tells the class."""
    root = tmp_path_factory.mktemp("fewshot_imgs")
    gen = torch.Generator().manual_seed(0)
    for label, name in enumerate(["dark", "light"]):
        (root / name).mkdir()
        for i in range(6):
            image = (60 + 120 * label + torch.randint(-30, 30, (3, 16, 16), generator=gen)).clamp(0, 255)
            write_png(image.to(torch.uint8), str(root / name / f"{i:02d}.png"))
    return str(root)


def test_cli_fewshot_prints_a_table_per_shots_and_classifier(folder, capsys):
    args = ["fewshot", "--backbone", "test_efficientnet", "--pretrained", "false", "--data.source", f"folder:{folder}",
            "--data.image_size", "16", "--data.val_split", "0.5", "--shots", "1,2", "--seeds", "2"]  # fmt: skip
    main(args)
    out = capsys.readouterr().out
    assert "| shots per class | ncm | knn |" in out
    assert "\n| 1 | " in out and "\n| 2 | " in out and "2 draws" in out
    with pytest.raises(ValueError, match="--shots takes positive numbers"):
        main([*args[:-4], "--shots", "0,2"])
    with pytest.raises(ValueError, match="only 3 labelled train images"):
        main([*args[:-4], "--shots", "4"])
