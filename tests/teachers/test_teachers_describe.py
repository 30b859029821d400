"""Region-function descriptions (paper 4.2.1 Eq. 2, A.4)."""
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from refound_core.errors import InputError
from refound_core.teachers.describe import (OpenAICompatDescriber, TemplateDescriber, build_prompt,
                                            detect_language)

ZH_NAMES = ["雅点联体开关", "名科门窗", "纱艺纺纱窗", "卡诺亚定制家居", "一零八汽车维修有限公司", "有家公寓"]
ZH_CATS = ["购物服务;家居建材市场", "购物服务;家居建材市场", "购物服务;家居建材市场", "购物服务;家具建材综合市场",
           "汽车维修;汽车综合维修", "商务住宅;住宅区"]
EN_NAMES = ["Blue Bottle", "Joe's Pizza", "Pizza Hut", "Central Library", "Pizza Hut", "First Bank"]
EN_CATS = ["food;cafe", "food;restaurant", "food;restaurant", "education;library", "food;restaurant", "finance;bank"]


def test_language_detection():
    assert detect_language(ZH_NAMES) == "zh"
    assert detect_language(EN_NAMES) == "en"
    assert detect_language(["星巴克", "Starbucks", "麦当劳"]) == "zh"
    assert detect_language(["", ""], ["餐饮服务"]) == "zh"
    assert detect_language([]) == "en"


def test_prompt_is_the_papers_in_the_data_language():
    zh = build_prompt(ZH_NAMES[:2])
    assert zh == "区域中有下列设施：雅点联体开关、名科门窗。请推断这个区域的功能，以及可能的居民活动。"
    en = build_prompt(EN_NAMES[:2])
    assert en.startswith("There are the following facilities in the region: Blue Bottle, Joe's Pizza.")
    assert "functionality of this region" in en


def test_prompt_thins_long_lists_with_an_ellipsis():
    names = [f"店{i}" for i in range(300)]
    p = build_prompt(names, max_names=10)
    listed = p.split("：")[1].split("。")[0].split("、")
    assert listed[-1] == "…" and len(listed) == 11
    assert listed[0] == "店0" and "店150" in listed


def test_template_is_deterministic_counts_and_order_free():
    d = TemplateDescriber()
    text = d.describe(EN_NAMES, EN_CATS)
    assert text == d.describe(list(EN_NAMES), list(EN_CATS))
    pairs = list(zip(EN_NAMES, EN_CATS))
    random.Random(3).shuffle(pairs)
    assert d.describe([n for n, _ in pairs], [c for _, c in pairs]) == text
    # 4 of 6 POIs are food: 67 %; food is named as the dominant function.
    assert "6 facilities in 3 functional categories" in text
    assert "food (4, 67%)" in text
    assert "mainly a food area" in text
    # The most frequent food place comes first among the examples.
    assert text.index("Pizza Hut") < text.index("Blue Bottle")
    assert "restaurant" in text  # finer level of the category


def test_template_writes_chinese_for_cjk_data():
    text = TemplateDescriber().describe(ZH_NAMES, ZH_CATS)
    assert text.startswith("该区域共有6个设施")
    assert "购物服务（4个，占67%）" in text
    assert "以购物服务功能为主" in text
    assert "卡诺亚定制家居" in text
    assert "This region" not in text


def test_template_handles_missing_categories_and_empty_regions():
    d = TemplateDescriber()
    assert d.describe([], []) == ""
    text = d.describe(["A", "B"], ["", ""])
    assert "other (2, 100%)" in text
    with pytest.raises(InputError):
        TemplateDescriber(language="fr")


def test_openai_describer_only_talks_to_this_machine():
    with pytest.raises(InputError, match="not on this machine"):
        OpenAICompatDescriber("http://example.com:8000/v1")
    with pytest.raises(InputError, match="not on this machine"):
        OpenAICompatDescriber("http://10.0.0.5:8000")
    assert OpenAICompatDescriber("http://localhost:8000").url == "http://localhost:8000/v1/chat/completions"
    assert OpenAICompatDescriber("http://[::1]:8000/v1/").url == "http://[::1]:8000/v1/chat/completions"


def test_openai_describer_posts_the_prompt_to_a_local_server():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            reply = json.dumps({"choices": [{"message": {"content": " 家居建材市场 "}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        d = OpenAICompatDescriber(f"http://127.0.0.1:{server.server_port}/v1", model="glm", max_tokens=64)
        assert d.describe(ZH_NAMES, ZH_CATS) == "家居建材市场"
        assert d.describe([], []) == ""  # no request for a region without POIs
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1
    path, body = seen[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "glm" and body["temperature"] == 0 and body["max_tokens"] == 64
    assert body["messages"][0]["content"] == build_prompt(ZH_NAMES)
    assert "glm" in d.identity()
    dead = OpenAICompatDescriber(f"http://127.0.0.1:{server.server_port}", timeout=2)
    with pytest.raises(InputError, match="did not answer"):
        dead.describe(["x"], [""])
