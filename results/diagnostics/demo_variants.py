import sys, json
sys.path.insert(0, "/work/main")
import tool_env, data, models, sampler, evaluate, tasks
R, C = tool_env.RESULT_OPEN, tool_env.RESULT_CLOSE
Q = tool_env.QUESTION_PREFIX
def demo(q, reason, query, result, reason2, ans):
    return [{"role": "user", "content": f"{Q} {q}"},
            {"role": "assistant", "content": f"<reasoning>{reason}</reasoning>\n" + '<tool>{"name": "wiki_search", "args": {"query": "%s"}}</tool>' % query},
            {"role": "user", "content": f"{R}\n{result}\n{C}"},
            {"role": "assistant", "content": f"<reasoning>{reason2}</reasoning>\n<answer>{ans}</answer>"}]
V = {
 "jp": demo("What is the internet country code of Japan?", "I should look up Japan's internet country code.", "Japan internet country code",
            "Japan - Communications - Internet country code\n.jp", "The result says the code is .jp.", ".jp"),
 "lake": None,
 "lakes": demo("What are the major lakes of Japan?", "I should look up Japan's major lakes.", "Japan major lakes",
               "Japan - Geography - Major lakes (area sq km)\nfresh water lake(s): Biwa-ko 688 sq km", "The result says the major lake is Biwa-ko.", "Biwa-ko"),
 "space": demo("What is the space agency of Japan?", "I should look up Japan's space agency.", "Japan space agency",
               "Japan - Space - Space agency/agencies\nJapan Aerospace Exploration Agency (JAXA; established in 2003) (2025)",
               "The result says the space agency is the Japan Aerospace Exploration Agency.", "Japan Aerospace Exploration Agency"),
}
name = sys.argv[1]
if V[name] is not None:
    tool_env.FEWSHOT[:] = V[name]
task = tasks.build({"task": "factbook", "fewshot": True, "demo": "jp"})  # DEMOS["jp"] is FEWSHOT, set above
env, rubric = task.env, task.rubric
if name == "space":
    print(repr(env.tools["wiki_search"]("Japan space agency")))
rows = data.spread_rows(data.load_task("factbook", "validation"), 48)
model, tok = models.load_model("smollm2-135m", "cpu")
m, eps = evaluate.evaluate(model, tok, rows, env, rubric, sampler.RolloutConfig(max_turn_tokens=64).greedy())
print(name, json.dumps({k: round(v, 3) for k, v in m.items() if isinstance(v, float)}))
m, eps = evaluate.evaluate(model, tok, rows[:24], env, rubric, sampler.RolloutConfig(max_turn_tokens=64), samples=4)
print(name, "sampled T0.9 x4", json.dumps({k: round(v, 3) for k, v in m.items() if isinstance(v, float)}))
