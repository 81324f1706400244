import pytest

from extractor.errors import TaskError
from extractor.tasks.prompting import PromptBuilder
from extractor.tasks.task import available, load_task


def test_bundled_tasks_load():
    names = set(available())
    assert {"jd_requirements", "spo", "review_topic", "skills"} <= names
    for name in names:
        task = load_task(name)
        assert task.schema["$schema"].endswith("2020-12/schema")
        assert len(task.schema_hash) == 16


def test_unknown_task_suggests_closest():
    with pytest.raises(TaskError, match="Did you mean 'jd_requirements'"):
        load_task("jd_requirment")


def test_unknown_key_names_file_key_and_fix(user_tasks):
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("few_shot:", "few_shots:"), encoding="utf-8")
    with pytest.raises(TaskError) as exc:
        load_task("mytask", [str(user_tasks)])
    msg = str(exc.value)
    assert "mytask.yaml" in msg and "few_shots" in msg and "did you mean 'few_shot'" in msg


def test_nested_unknown_key(user_tasks):
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("max_new_tokens:", "max_new_token:"),
                    encoding="utf-8")
    with pytest.raises(TaskError, match=r"generation\.max_new_token.*did you mean 'max_new_tokens'"):
        load_task("mytask", [str(user_tasks)])


def test_wrong_type_and_missing_key(user_tasks):
    spec = user_tasks / "prompts" / "mytask.yaml"
    text = spec.read_text(encoding="utf-8")
    spec.write_text(text.replace("  max_new_tokens: 160", "  max_new_tokens: lots"), encoding="utf-8")
    with pytest.raises(TaskError, match="generation.max_new_tokens"):
        load_task("mytask", [str(user_tasks)])
    spec.write_text(text.replace("input_fields: [text]\n", ""), encoding="utf-8")
    with pytest.raises(TaskError, match="missing required key 'input_fields'"):
        load_task("mytask", [str(user_tasks)])


def test_template_syntax_error_at_load(user_tasks):
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("{{ text }}", "{{ text "), encoding="utf-8")
    with pytest.raises(TaskError, match="template syntax error"):
        load_task("mytask", [str(user_tasks)])


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ text.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_sandbox_blocks_python_internals(user_tasks, payload):
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("{{ text }}", payload), encoding="utf-8")
    with pytest.raises(Exception) as exc:
        task = load_task("mytask", [str(user_tasks)])
        PromptBuilder(task).build({"text": "x"})
    assert "uid=" not in str(exc.value)


def test_include_cannot_read_files(user_tasks):
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("{{ text }}", "{% include '/etc/passwd' %}"),
                    encoding="utf-8")
    with pytest.raises(Exception) as exc:
        PromptBuilder(load_task("mytask", [str(user_tasks)])).build({"text": "x"})
    assert "root:" not in str(exc.value)


def test_schema_path_cannot_escape(user_tasks):
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("schema: mytask.json", "schema: ../../../etc/passwd"),
                    encoding="utf-8")
    with pytest.raises(TaskError, match="outside the task folder"):
        load_task("mytask", [str(user_tasks)])


def test_few_shot_must_match_schema(user_tasks):
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("学历要求: [硕士]", "学历要求: 硕士"), encoding="utf-8")
    with pytest.raises(TaskError, match=r"few_shot\.0\.output does not match the schema"):
        load_task("mytask", [str(user_tasks)])


def test_user_task_via_env(user_tasks, monkeypatch):
    monkeypatch.setenv("EXTRACTOR_TASKS_DIR", str(user_tasks))
    assert load_task("mytask").name == "mytask"


def test_raw_prompt_matches_seed_format():
    prompt = PromptBuilder(load_task("spo")).build({"text": "《喜剧之王》周星驰主演。"})
    assert prompt == ("Instruction: 你现在是一个很厉害的阅读理解器，严格按照人类指令进行回答。\n"
                      "Input: 抽取下列句子中包含的所有关系，必须用json形式返回结果，除此之外不要说任何其他话。\n\n"
                      "《喜剧之王》周星驰主演。\nAnswer: ")


def test_one_shot_example_in_jd_prompt():
    prompt = PromptBuilder(load_task("jd_requirements")).build({"text": "本科，java"})
    assert '"编程语言": ["python", "c++"]' in prompt and prompt.endswith("本科，java\nAnswer: ")
