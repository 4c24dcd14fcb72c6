"""Teacher scoring: log-probs of student-generated tokens under the teacher model.

Modules (one job each; import the one you need, nothing heavy is imported here):
    types.py           TeacherScores / ScoreRequest + split / concat helpers (the shared layout)
    scoring.py         score_sequences(model, ...): in-process scoring with a HF causal LM
    loading.py         load_teacher / describe_teacher (vocab_info)
    ray_pool.py        TeacherPool: data-parallel Ray actors
    wire.py            safetensors request/response encoding for HTTP
    http_service.py    FastAPI service + serve_teacher (CLI hook); API in teacher/API.md
    http_client.py     HttpTeacherClient (retries, TeacherUnavailableError)
    vllm_client.py     VllmServerTeacherClient (external vLLM server, prompt_logprobs)
    tokenizer_check.py check_tokenizers_compatible / TokenizerMismatchError
    testing.py         tiny random teachers, random batches, naive reference, fake vLLM server
"""
