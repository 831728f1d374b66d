"""`plural-diffusion serve`: a new user rates images the active query picks, sees the taste the
project infers, gets images generated for it, and the ratings land in the CSV `generate --ratings`
reads; `serve --collect` gives each rater their own link and appends to the scores / pairs tables.
Bad input (scores out of range or not numbers, stale forms, unknown links, checkpoints that cannot
take a taste) gets a clear message and loses nothing. The browser tests drive headless Chromium
(skipped without it, unless PLURAL_DIFFUSION_REQUIRE_BROWSER=1, as in test_report.py)."""

import json
import shutil
import time

import pandas as pd
import pytest
import torch
from PIL import Image

from plural_diffusion.cli import main as pd_main
from plural_diffusion.collect import CollectConfig, Collector
from plural_diffusion.collect import create_app as collect_app
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import train
from plural_diffusion.serve import ServeConfig, build
from plural_diffusion.train_config import TrainConfig
from plural_diffusion.web import Server, list_images, parse_score
from reward_models.config import load_config
from reward_models.data import load_ratings
from reward_models.errors import UserError
from tests.test_report import headless_chromium


# ---- pieces --------------------------------------------------------------------------------
def test_a_score_must_be_a_finite_number_in_range():
    assert parse_score(" 7.5 ", 0, 10, "image 1") == 7.5
    for raw, says in (
        ("", "no score"),
        ("abc", "not a number"),
        ("11", "out of range"),
        ("nan", "out of range"),
        ("-1", "out of range"),
    ):
        with pytest.raises(UserError, match=says):
            parse_score(raw, 0, 10, "image 1")


def test_only_images_inside_the_folder_are_listed(tmp_path):
    inside, outside = tmp_path / "imgs", tmp_path / "secret"
    inside.mkdir(), outside.mkdir()
    Image.new("RGB", (4, 4)).save(inside / "a.png")
    Image.new("RGB", (4, 4)).save(outside / "b.png")
    (inside / "link.png").symlink_to(outside / "b.png")  # leads outside: never served
    (inside / "notes.txt").write_text("not an image")
    assert list_images(inside) == [(inside / "a.png").resolve()]
    with pytest.raises(UserError, match="no such folder"):
        list_images(tmp_path / "missing")


# ---- collect -------------------------------------------------------------------------------
@pytest.fixture()
def image_dir(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        colour = (40 * i, 255 - 40 * i, 100)
        Image.new("RGB", (16, 16), colour).save(folder / ("sub" if i % 2 else "") / f"im{i}.png")
    return folder


def collector(image_dir, out, **kw):
    cfg = CollectConfig(
        str(image_dir),
        str(out),
        ["alice", "bob"],
        **{"scores_per_rater": 2, "pairs_per_rater": 2, **kw},
    )
    return Collector(cfg)


def test_collect_appends_each_raters_answers_to_tables_reward_models_reads(image_dir, tmp_path):
    out = tmp_path / "ratings"
    c = collector(image_dir, out)
    client = collect_app(c).test_client()
    alice, bob = (f"/r/{c.tokens[r]}" for r in ("alice", "bob"))
    page = client.get(alice).get_data(as_text=True)
    assert "0 of 4 answered" in page and 'name="task" value="scores-0"' in page
    assert client.post(alice, data={"task": "scores-0", "score": "7"}).status_code == 303
    # the same form again (a double submit): refused, nothing appended
    again = client.post(alice, data={"task": "scores-0", "score": "9"})
    assert again.status_code == 400 and "out of date" in again.get_data(as_text=True)
    assert client.post(alice, data={"task": "pairs-0", "winner": "b"}).status_code == 303
    bad = client.post(alice, data={"task": "scores-1", "score": "eleven"})
    assert bad.status_code == 400 and "is not a number" in bad.get_data(as_text=True)
    bad = client.post(alice, data={"task": "scores-1", "score": "12"})
    assert "out of range" in bad.get_data(as_text=True)
    bad = client.post(alice, data={"task": "scores-1", "score": "<b>7</b>"})
    shown = bad.get_data(as_text=True)
    assert "&lt;b&gt;7&lt;/b&gt;" in shown and "<b>7</b>" not in shown  # echoed, escaped
    bad = client.post(alice, data={"task": "scores-1", "score": "4", "image": "../../etc/passwd"})
    assert bad.status_code == 303  # fields the form does not have are ignored
    assert client.post(alice, data={"task": "pairs-1", "winner": "left"}).status_code == 400

    # bob sees his own progress only; unknown links and images outside the list are 404s
    assert "0 of 4 answered" in client.get(bob).get_data(as_text=True)
    assert client.get("/r/not-a-token").status_code == 404
    assert client.get(f"{alice}/image/99").status_code == 404
    assert client.get(f"{alice}/image/0").status_code == 200

    scores, pairs = pd.read_csv(out / "scores.csv"), pd.read_csv(out / "pairs.csv")
    assert scores["rater_id"].tolist() == ["alice", "alice"]
    assert scores["score"].tolist() == [7, 4]
    assert pairs[["rater_id", "winner"]].values.tolist() == [["alice", "b"]]
    data = load_ratings(out)  # what `reward-models train data.path=OUT` reads; images exist
    assert len(data.scores) == 2 and len(data.pairs) == 1
    assert all(p.is_file() for p in map(data.scores.image_path, data.scores.df["image"]))

    # a restart keeps the links and the answers, and alice carries on where she stopped
    c2 = collector(image_dir, out)
    assert c2.tokens == c.tokens
    again = collect_app(c2).test_client().get(alice).get_data(as_text=True)
    assert "3 of 4 answered" in again and 'value="pairs-1"' in again
    assert (out / ".rater-tokens.json").stat().st_mode & 0o777 == 0o600


def test_a_raters_plan_asks_each_image_and_each_pair_at_most_once(image_dir, tmp_path):
    c = collector(image_dir, tmp_path / "o", scores_per_rater=50, pairs_per_rater=50)
    plan = c.plans["alice"]
    assert sorted(plan["scores"]) == list(range(6))  # 6 images: each once
    assert len({frozenset(p) for p in plan["pairs"]}) == len(plan["pairs"]) == 15
    assert c.plans["bob"] != plan  # each rater their own order
    again = collector(image_dir, tmp_path / "o", scores_per_rater=50, pairs_per_rater=50)
    assert again.plans["alice"] == plan  # the same after a restart


def test_collect_refuses_bad_rater_names_and_foreign_tables(image_dir, tmp_path):
    with pytest.raises(UserError, match="rater names"):
        Collector(CollectConfig(str(image_dir), str(tmp_path / "o"), ["../evil"]))
    out = tmp_path / "o2"
    out.mkdir()
    (out / "scores.csv").write_text("x,y\n1,2\n")
    with pytest.raises(UserError, match="not a scores table"):
        collector(image_dir, out)
    assert (out / "scores.csv").read_text() == "x,y\n1,2\n"  # left as it was


# ---- rate and receive ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def matched_checkpoint(toy_assets, reward_run, tmp_path_factory):
    """A taste-conditioned policy after one tiny epoch (4 DDIM steps)."""
    out = tmp_path_factory.mktemp("serve-matched")
    overrides = [
        f"base={toy_assets.base}",
        f"rewards={reward_run}",
        f"out_dir={out}",
        "objective=matched",
        "epochs=1",
        "save_every=1",
        "sampling.steps=4",
        "draft.batch_size=6",
        "draft.steps_per_epoch=1",
        "tensorboard=false",
    ]
    train(load_config(TrainConfig, CONFIGS / "toy.yaml", overrides), progress=False)
    return next((out / "checkpoints").glob("epoch-*"))


def test_rounds_save_the_ratings_generate_reads_and_stale_forms_save_nothing(
    matched_checkpoint, tmp_path
):
    from plural_diffusion.generate import taste_from_ratings_file

    cfg = ServeConfig(
        str(matched_checkpoint), out=str(tmp_path / "me"), per_round=3, pool=40, seeds=2
    )
    app, session = build(cfg)
    client = app.test_client()
    first = list(session.questions)
    assert len(first) == 3 and len(set(first)) == 3
    assert "No taste yet" in client.get("/").get_data(as_text=True)
    form = {"round": session.round, **{f"score_{i}": str(s) for i, s in zip(first, (9, 2, 5))}}
    assert client.post("/rate", data=form).status_code == 303
    replay = client.post("/rate", data=form)
    assert replay.status_code == 400 and "out of date" in replay.get_data(as_text=True)
    saved = pd.read_csv(session.ratings_file)
    assert saved["score"].tolist() == [9, 2, 5]
    assert not set(session.questions) & set(first)  # the next round asks other images

    # a bad score: a message, and the file is as it was
    bad = {"round": session.round, **{f"score_{i}": "4" for i in session.questions}}
    bad[f"score_{session.questions[1]}"] = "11"
    response = client.post("/rate", data=bad)
    assert response.status_code == 400 and "image 2: 11 is out of range" in response.get_data(
        as_text=True
    )
    assert pd.read_csv(session.ratings_file).equals(saved)

    # the page's taste is the one `generate --ratings` infers from the saved file
    z = taste_from_ratings_file(session.ratings_file, session.rewards).z
    assert torch.allclose(z, session.taste.z, atol=1e-4)
    page = client.get("/").get_data(as_text=True)
    assert "From your 3 ratings" in page and 'id="nearest"' in page
    probs = session.taste.cluster_probability
    assert probs.sum().item() == pytest.approx(1.0)

    # images for the most probable cluster's taste; a taste the page does not offer is refused
    bogus = client.post("/generate", data={"taste": "../x"})
    assert bogus.status_code == 409 and "unknown taste" in bogus.get_data(as_text=True)
    assert client.post("/generate", data={"taste": "cluster"}).status_code == 303
    deadline = time.time() + 120
    while (job := client.get("/progress").get_json())["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.2)
    assert job["state"] == "done" and job["done"] == job["total"] == 2 * cfg.seeds
    assert client.get(job["images"][0]).status_code == 200
    assert client.get(f"/generated/{job['id']}/99").status_code == 404
    manifest = json.loads(next((tmp_path / "me" / "generated").glob("*/manifest.json")).read_text())
    nearest = session.taste.nearest_clusters(session.rewards.cluster_names)[0][0]
    assert manifest["tastes"][0]["spec"] == f"cluster:{nearest}"

    # a restarted server reads the ratings back
    _, again = build(cfg)
    assert len(again.rated) == 3 and torch.allclose(again.taste.z, session.taste.z)


def test_a_checkpoint_that_cannot_take_a_taste_is_a_one_line_error(
    matched_checkpoint, reward_run, tmp_path, capsys
):
    blind = tmp_path / "blind"
    shutil.copytree(matched_checkpoint / "policy", blind)
    shutil.rmtree(blind / "taste_conditioner")
    no_rater = tmp_path / "run"
    shutil.copytree(reward_run, no_rater, ignore=shutil.ignore_patterns("rater"))
    spoiled = tmp_path / "spoiled"
    spoiled.mkdir()
    (spoiled / "ratings.csv").write_text("image,score\nx.png,lots\n")
    for args, says in (
        (["--checkpoint", str(blind)], "no taste conditioner"),
        (["--checkpoint", str(matched_checkpoint), "--out", str(spoiled)], "not a ratings file"),
        (["--checkpoint", str(matched_checkpoint), "--rewards", str(no_rater)], "no rater head"),
        (
            ["--collect", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--rater", "a"],
            "no such folder",
        ),
        ([], "needs --checkpoint"),
        (["--checkpoint", str(matched_checkpoint), "--dtype", "fp16"], "--dtype fp16 runs on a"),
    ):
        out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
        with pytest.raises(SystemExit) as e:
            pd_main(["serve", *out, *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert (spoiled / "ratings.csv").read_text() == "image,score\nx.png,lots\n"  # left as it was


# ---- in the browser ------------------------------------------------------------------------
@pytest.fixture()
def chromium():
    with headless_chromium() as driver:
        driver.implicitly_wait(2)
        yield driver


def text_after_submit(driver, element_id: str, expected: str) -> str:
    """The text of element `element_id` once the page a click submitted shows `expected`.

    Read in one script call, holding no element between calls: while the new page loads, an
    element found on the old one goes stale, which Chromium reports either as a stale element
    or as an "unknown error" (a node that no longer belongs to the document). An error while
    the page changes is retried until the wait runs out."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    script = "const e = document.getElementById(arguments[0]); return e ? e.innerText : null;"

    def shown(d):
        text = d.execute_script(script, element_id)
        return text if text is not None and expected in text else False

    return WebDriverWait(driver, 15, ignored_exceptions=(WebDriverException,)).until(shown)


def images_load(driver, selector: str, n: int) -> bool:
    """Whether the page shows `n` images matching `selector` and every one decodes (waiting for
    them to finish loading)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    script = f"return Array.from(document.querySelectorAll('{selector}'))"
    script += ".map(i => i.complete && i.naturalWidth > 0);"
    loaded = WebDriverWait(driver, 15, ignored_exceptions=(WebDriverException,)).until(
        lambda d: (flags := d.execute_script(script)) and len(flags) == n and all(flags)
    )
    return bool(loaded)


def test_in_the_browser_a_user_rates_sees_their_taste_and_gets_images(
    matched_checkpoint, tmp_path, chromium
):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cfg = ServeConfig(
        str(matched_checkpoint), out=str(tmp_path / "me"), per_round=3, pool=40, seeds=3
    )
    app, session = build(cfg)
    server = Server(app).start()
    try:
        chromium.get(server.url)
        assert images_load(chromium, "#rate img", 3)
        boxes = chromium.find_elements(By.CSS_SELECTOR, "#rate input[type=number]")
        for box, score in zip(boxes, ("8", "x", "3")):
            chromium.execute_script("arguments[0].type = 'text'", box)  # let 'x' through
            box.send_keys(score)
        chromium.find_element(By.CSS_SELECTOR, "#rate button").click()
        text_after_submit(chromium, "message", "image 2: 'x' is not a number")
        assert not session.ratings_file.exists()  # nothing saved from a bad round

        for box, score in zip(
            chromium.find_elements(By.CSS_SELECTOR, "#rate input[type=number]"), ("8", "1", "3")
        ):
            box.send_keys(score)
        chromium.find_element(By.CSS_SELECTOR, "#rate button").click()
        text_after_submit(chromium, "message", "saved 3 ratings")
        nearest = chromium.find_element(By.ID, "nearest").text
        assert nearest in session.rewards.cluster_names
        assert pd.read_csv(session.ratings_file)["score"].tolist() == [8, 1, 3]

        chromium.find_element(By.CSS_SELECTOR, "#generate button").click()
        WebDriverWait(chromium, 120, ignored_exceptions=(WebDriverException,)).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.generated")) == 2 * 3
        )  # retried while the page that the click asked for replaces this one
        assert images_load(chromium, "img.generated", 6)
        assert "6 images for your taste" in chromium.find_element(By.ID, "status").text
        manifest = json.loads(
            next((tmp_path / "me" / "generated").glob("*/manifest.json")).read_text()
        )
        assert manifest["tastes"][0]["z"] == pytest.approx(session.taste.z.tolist(), abs=1e-5)
    finally:
        server.stop()


def test_in_the_browser_each_rater_answers_through_their_own_link(image_dir, tmp_path, chromium):
    from selenium.webdriver.common.by import By

    out = tmp_path / "ratings"
    c = collector(image_dir, out)
    server = Server(collect_app(c)).start()
    try:
        links = c.links(server.url)
        chromium.get(links["bob"])
        assert "Hello bob" in chromium.page_source and images_load(chromium, "img", 1)
        chromium.find_element(By.NAME, "score").send_keys("6")
        chromium.find_element(By.CSS_SELECTOR, "#score button").click()
        text_after_submit(chromium, "progress", "1 of 4 answered")
        assert images_load(chromium, "img", 2)
        chromium.find_element(By.CSS_SELECTOR, "button[value=a]").click()
        text_after_submit(chromium, "progress", "2 of 4 answered")
        chromium.get(links["alice"])
        text_after_submit(chromium, "progress", "0 of 4 answered")
    finally:
        server.stop()
    assert pd.read_csv(out / "scores.csv")[["rater_id", "score"]].values.tolist() == [["bob", 6]]
    assert pd.read_csv(out / "pairs.csv")[["rater_id", "winner"]].values.tolist() == [["bob", "a"]]
