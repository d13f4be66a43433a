"""Short Jinja reproductions of real chat templates, and tokenizers with their special tokens.

Each template keeps what decides where turns begin and end in its original (read from the model's
tokenizer_config.json / chat_template.jinja, as mirrored in llama.cpp's models/templates/): headers,
end-of-turn tokens, how tool calls and tool results are written, and the rewriting of earlier turns
(reasoning dropped before the last user message, a system prompt folded into a user turn). Long
instructions and tool descriptions are shortened; the structure is the original's.
"""

from __future__ import annotations

# Qwen3-30B-A3B (tokenizer_config.json): ChatML; reasoning kept only after the last real user query, the final
# assistant turn always gets a <think> block; tool calls as JSON in <tool_call>; tool results inside user turns.
QWEN3 = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and not (message.content.startswith('<tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}
            {%- set tool_call = tool_call.function if tool_call.function else tool_call %}
            {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Llama-2-chat (meta-llama/Llama-2-7b-chat-hf): the system prompt folded into the first user turn as <<SYS>>,
# stripped contents, each reply followed by eos; the roles must alternate (a tool message raises).
LLAMA2 = """\
{%- if messages[0].role == 'system' %}
    {%- set loop_messages = messages[1:] %}{%- set system_message = messages[0].content %}
{%- else %}
    {%- set loop_messages = messages %}{%- set system_message = false %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if loop.index0 == 0 and system_message != false %}
        {%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message.content %}
    {%- else %}
        {%- set content = message.content %}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {%- elif message.role == 'assistant' %}
        {{- ' ' + content.strip() + ' ' + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# Mistral-7B-Instruct-v0.3: [INST] turns with no space before [/INST]; the tools before the last user turn, the
# system prompt folded into the last user turn; tool calls as a JSON list after [TOOL_CALLS] with 9-character ids,
# results in [TOOL_RESULTS]; replies are " " + content + eos.
MISTRAL_V3 = """\
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content %}{%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message.role == 'user' %}
        {%- if tools and message == user_messages[-1] %}
            {{- '[AVAILABLE_TOOLS] [' }}
            {%- for tool in tools %}{{- (tool | tojson) + (', ' if not loop.last else '') }}{%- endfor %}
            {{- '][/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message.content + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message.content + '[/INST]' }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls %}
        {{- '[TOOL_CALLS] [' }}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.id is not defined or tool_call.id | length != 9 %}
                {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
            {%- endif %}
            {%- set out = tool_call.function | tojson %}
            {{- out[:-1] + ', "id": "' + tool_call.id + '"}' + (', ' if not loop.last else ']' + eos_token) }}
        {%- endfor %}
    {%- elif message.role == 'assistant' %}
        {{- ' ' + message.content | trim + eos_token }}
    {%- elif message.role == 'tool' %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content | string + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# gpt-oss (openai/gpt-oss-20b chat_template.jinja), harmony: a system header with the date, the system prompt and the
# tools as a developer message, analysis (reasoning, `thinking`) and final channels; reasoning rendered only for a
# final assistant turn, or for a tool call with no final answer after it; the last reply ends with <|return|>,
# earlier ones with <|end|>, a tool call with <|call|>; tool results are JSON strings from `functions.<name>`.
HARMONY = """\
{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n' }}
{{- 'Current date: ' + strftime_now('%Y-%m-%d') + '\\n\\nReasoning: medium\\n\\n' }}
{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.' }}
{%- if tools %}{{- "\\nCalls to these tools must go to the commentary channel: 'functions'." }}{%- endif %}
{{- '<|end|>' }}
{%- if messages[0].role == 'developer' or messages[0].role == 'system' %}
    {%- set developer_message = messages[0].content %}{%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = '' %}{%- set loop_messages = messages %}
{%- endif %}
{%- if developer_message or tools %}
    {{- '<|start|>developer<|message|>' }}
    {%- if developer_message %}{{- '# Instructions\\n\\n' + developer_message + '\\n\\n' }}{%- endif %}
    {%- if tools %}
        {{- '# Tools\\n\\n## functions\\n\\nnamespace functions {\\n\\n' }}
        {%- for tool in tools %}{{- '// ' + tool.function.description + '\\ntype ' + tool.function.name + ' = (_: any) => any;\\n\\n' }}{%- endfor %}
        {{- '} // namespace functions' }}
    {%- endif %}
    {{- '<|end|>' }}
{%- endif %}
{%- set last_tool_call = namespace(name=none) %}
{%- for message in loop_messages %}
    {%- if message.role == 'assistant' %}
        {%- if 'tool_calls' in message %}
            {%- set future_final_message = namespace(found=false) %}
            {%- for future_message in loop_messages[loop.index:] %}
                {%- if future_message.role == 'assistant' and 'tool_calls' not in future_message %}
                    {%- set future_final_message.found = true %}
                {%- endif %}
            {%- endfor %}
            {%- set tool_call = message.tool_calls[0] %}
            {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
            {%- if message.content and message.thinking %}
                {{- raise_exception('Cannot pass both content and thinking in an assistant message with tool calls!') }}
            {%- elif message.content and not future_final_message.found %}
                {{- '<|start|>assistant<|channel|>analysis<|message|>' + message.content + '<|end|>' }}
            {%- elif message.thinking and not future_final_message.found %}
                {{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}
            {%- endif %}
            {{- '<|start|>assistant to=functions.' + tool_call.name + '<|channel|>commentary json<|message|>' }}
            {{- tool_call.arguments | tojson + '<|call|>' }}
            {%- set last_tool_call.name = tool_call.name %}
        {%- elif loop.last and not add_generation_prompt %}
            {%- if 'thinking' in message %}
                {{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}
            {%- endif %}
            {{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}
        {%- else %}
            {{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}
            {%- set last_tool_call.name = none %}
        {%- endif %}
    {%- elif message.role == 'tool' %}
        {%- if last_tool_call.name is none %}
            {{- raise_exception('Message has tool role, but there was no previous assistant message with a tool call!') }}
        {%- endif %}
        {{- '<|start|>functions.' + last_tool_call.name + ' to=assistant<|channel|>commentary<|message|>' }}
        {{- message.content | tojson + '<|end|>' }}
    {%- elif message.role == 'user' %}
        {{- '<|start|>user<|message|>' + message.content + '<|end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}
"""

# DeepSeek-V3.1 (llama.cpp models/templates/deepseek-ai-DeepSeek-V3.1.jinja): system prompts joined after bos, the
# reply after <｜Assistant｜></think> (reasoning never rendered in history), tool calls with JSON-text arguments
# between <｜tool▁calls▁begin｜> markers, results in <｜tool▁output▁begin｜>; a reply after a tool result has no
# header; every reply ends with <｜end▁of▁sentence｜>.
DEEPSEEK_V31 = """\
{%- set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true, is_last_user=false) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- set ns.system_prompt = ns.system_prompt + ('' if ns.is_first_sp else '\\n\\n') + message.content %}
        {%- set ns.is_first_sp = false %}
    {%- endif %}
{%- endfor %}
{{- bos_token + ns.system_prompt }}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.is_tool = false %}{%- set ns.is_first = false %}{%- set ns.is_last_user = true %}
        {{- '<｜User｜>' + message.content }}
    {%- endif %}
    {%- if message.role == 'assistant' and message.tool_calls is defined and message.tool_calls is not none %}
        {%- if ns.is_last_user %}{{- '<｜Assistant｜></think>' }}{%- endif %}
        {%- set ns.is_last_user = false %}{%- set ns.is_first = false %}{%- set ns.is_tool = false %}
        {%- for tool in message.tool_calls %}
            {%- if not ns.is_first %}
                {{- message.content + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool.function.name + '<｜tool▁sep｜>' + tool.function.arguments + '<｜tool▁call▁end｜>' }}
                {%- set ns.is_first = true %}
            {%- else %}
                {{- '<｜tool▁call▁begin｜>' + tool.function.name + '<｜tool▁sep｜>' + tool.function.arguments + '<｜tool▁call▁end｜>' }}
            {%- endif %}
        {%- endfor %}
        {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}
    {%- endif %}
    {%- if message.role == 'assistant' and (message.tool_calls is not defined or message.tool_calls is none) %}
        {%- if ns.is_last_user %}{{- '<｜Assistant｜></think>' }}{%- endif %}
        {%- set ns.is_last_user = false %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}{%- set content = content.split('</think>', 1)[1] %}{%- endif %}
        {{- content + '<｜end▁of▁sentence｜>' }}
        {%- set ns.is_tool = false %}
    {%- endif %}
    {%- if message.role == 'tool' %}
        {%- set ns.is_last_user = false %}{%- set ns.is_tool = true %}
        {{- '<｜tool▁output▁begin｜>' + message.content + '<｜tool▁output▁end｜>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt and ns.is_last_user and not ns.is_tool %}{{- '<｜Assistant｜></think>' }}{%- endif %}
"""

# GLM-4.5 (llama.cpp models/templates/glm_4_5.jinja): [gMASK]<sop>, role tokens and no end-of-turn token (the model
# stops by writing the next role's token), reasoning in <think> only after the last user turn (earlier replies get
# an empty <think></think>), stripped contents, tool calls as <tool_call>name with <arg_key>/<arg_value> pairs, results
# under <|observation|>.
GLM45 = """\
{{- '[gMASK]<sop>' }}
{%- if tools %}
    {{- '<|system|>\\n# Tools\\n\\n<tools>\\n' }}
    {%- for tool in tools %}{{- (tool | tojson) + '\\n' }}{%- endfor %}
    {{- '</tools>' }}
{%- endif %}
{%- set ns = namespace(last_user_index=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user_index = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
    {%- if m.role == 'user' %}
        {{- '<|user|>\\n' + m.content }}
    {%- elif m.role == 'assistant' %}
        {{- '<|assistant|>' }}
        {%- set reasoning_content = m.reasoning_content if m.reasoning_content is string else '' %}
        {%- if loop.index0 > ns.last_user_index and reasoning_content %}
            {{- '\\n<think>' + reasoning_content.strip() + '</think>' }}
        {%- else %}
            {{- '\\n<think></think>' }}
        {%- endif %}
        {%- if m.content.strip() %}{{- '\\n' + m.content.strip() }}{%- endif %}
        {%- for tc in m.tool_calls or [] %}
            {%- set tc = tc.function if tc.function else tc %}
            {{- '\\n<tool_call>' + tc.name }}
            {%- for k, v in tc.arguments.items() %}
                {{- '\\n<arg_key>' + k + '</arg_key>\\n<arg_value>' + (v if v is string else v | tojson) + '</arg_value>' }}
            {%- endfor %}
            {{- '\\n</tool_call>' }}
        {%- endfor %}
    {%- elif m.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|observation|>' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}
    {%- elif m.role == 'system' %}
        {{- '<|system|>\\n' + m.content }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}
"""

# Per template: (special tokens, tokens added as plain (non-special) tokens, bos, eos).
TOKENS = {
    "qwen3": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], ["<think>", "</think>", "<tool_call>", "</tool_call>",
                                                                "<tool_response>", "</tool_response>"], None, "<|im_end|>"),
    "llama2": ([], [], "<s>", "</s>"),
    "mistral_v3": (["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                    "[/TOOL_RESULTS]"], [], "<s>", "</s>"),
    "harmony": (["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|endoftext|>"], [],
                "<|startoftext|>", "<|return|>"),
    "deepseek_v31": (["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                      "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"], ["</think>"],
                     "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "glm45": (["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>",
               "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>",
               "</tool_response>"], [], None, "<|endoftext|>"),
}
TEMPLATES = {"qwen3": QWEN3, "llama2": LLAMA2, "mistral_v3": MISTRAL_V3, "harmony": HARMONY, "deepseek_v31": DEEPSEEK_V31,
             "glm45": GLM45}

CORPUS = ["You are a payments assistant. What fee applies to card refunds? Card refunds carry a 2% fee.",
          "And bank transfers? Bank transfers cost 0.50 EUR. Refund fees follow the card fee. Bank transfers are flat.",
          'What is the balance of acct_42? I should look it up. {"balance": "120.00 EUR"} get_balance account',
          "The balance of acct_42 is 120.00 EUR. Balance of an account."]


def template_tokenizer(name: str):
    """A byte-level BPE with ``name``'s special tokens, bos/eos and chat template (well under a second)."""
    from moetune.data.tokenizer import train_bpe_tokenizer

    special, plain, bos, eos = TOKENS[name]
    tokenizer = train_bpe_tokenizer(CORPUS * 4, 400)
    extra = [t for t in [*special, bos, eos] if t and t not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(extra))})
    tokenizer.add_tokens(plain)
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    tokenizer.chat_template = TEMPLATES[name]
    return tokenizer
