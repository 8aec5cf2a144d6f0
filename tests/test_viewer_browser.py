"""The viewer in a real browser: `cxrdebias view`'s server and headless Chromium (Debian
`chromium` + `chromium-driver`, driven by selenium; skipped when they are absent)."""

from __future__ import annotations

import pytest

from cxrdebias.deploy.runtime import collect_inputs, load_model
from cxrdebias.deploy.viewer_state import predict_study
from tests.conftest import REPO, viewer_server

pytestmark = pytest.mark.usefixtures("torch_one_thread")

VIEWER = REPO / "apps" / "viewer.py"

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def test_viewer_in_headless_chromium(model_file, study_data, tmp_path):
    """`cxrdebias view`'s command line serves the page (OOD fields added to the predictions, see
    tests/viewer_ood.py); in Chromium: the worklist renders, a click on a row opens that image
    (overlay loaded), key N opens the next row, a flagged image shows the OOD badge, and the
    toolbar has no Deploy button."""
    import shutil
    from pathlib import Path

    if not Path(CHROMIUM).is_file() or shutil.which("chromedriver") is None and not Path(CHROMEDRIVER).is_file():
        pytest.skip(f"needs {CHROMIUM} and chromedriver (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from cxrdebias.deploy.viewer_worklist import OOD_BADGE, sort_worklist
    from tests.viewer_ood import ood_page

    manifest, _ = study_data
    model = load_model(model_file)
    table, _, _ = predict_study(model, collect_inputs([manifest]))
    order = [f.rsplit("/", 1)[1] for f in sort_worklist(table, "probability", model.metadata.threshold)["file"]]  # the page's order
    flagged = order[1]
    driver = None
    with viewer_server(model_file, [manifest], tmp_path, script=ood_page(tmp_path, VIEWER, [flagged])) as port:
        try:
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1800"):
                options.add_argument(arg)
            driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or CHROMEDRIVER), options=options)
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 120, ignored_exceptions=(StaleElementReferenceException,))
            wait.until(lambda d: any("NOT FOR CLINICAL USE" in w.text for w in d.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]')))
            grid = wait.until(lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, '[data-testid="stMain"] [data-testid="stDataFrame"]')), False))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stToolbar"]'))
            assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAppDeployButton"]')  # client.toolbarMode viewer
            assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"]')  # nothing open yet
            assert grid.size["height"] >= 35 * (1 + len(order))  # header + every row

            def opened(d):
                """The name of the open image once its overlay <img> is loaded, else False."""
                caps = {c.text: c for c in d.find_elements(By.CSS_SELECTOR, '[data-testid="stImageCaption"]')}
                imgs = [im.find_elements(By.TAG_NAME, "img") for im in d.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"]')]
                ready = imgs and all(i and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i[0]) for i in imgs)
                names = [t.split(" (level")[0].rsplit("/", 1)[1] for t in caps if not t.startswith("Grad-CAM")]
                return names[0] if ready and names and any(t.startswith("Grad-CAM overlay") for t in caps) else False

            def click_row(i):  # the row-selection box left of row i (the grid is a canvas)
                ActionChains(driver).move_to_element_with_offset(grid, -grid.size["width"] / 2 + 12, -grid.size["height"] / 2 + 35 * (i + 1.5)).click().perform()

            click_row(2)
            assert wait.until(lambda d: opened(d) == order[2] and opened(d))
            metrics = [m.text for m in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')]
            assert any("P(positive)" in m for m in metrics) and any("Threshold" in m for m in metrics)
            assert not any(OOD_BADGE in a.text for a in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]'))
            click_row(1)  # another row: another image, out of distribution
            assert wait.until(lambda d: opened(d) == flagged and opened(d))
            assert wait.until(lambda d: any(OOD_BADGE in a.text for a in d.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]')))
            driver.find_element(By.TAG_NAME, "h1").click()  # focus on the page, not in the grid
            ActionChains(driver).send_keys("n").perform()  # keyboard: next row
            assert wait.until(lambda d: opened(d) == order[2] and opened(d))
            assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        finally:
            if driver is not None:
                driver.quit()
