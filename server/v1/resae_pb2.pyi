from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EditMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDIT_MODE_UNSPECIFIED: _ClassVar[EditMode]
    EDIT_MODE_ADD: _ClassVar[EditMode]
    EDIT_MODE_CLAMP: _ClassVar[EditMode]
    EDIT_MODE_SCALE: _ClassVar[EditMode]
    EDIT_MODE_ABLATE: _ClassVar[EditMode]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_PROMPT: _ClassVar[Phase]
    PHASE_GENERATION: _ClassVar[Phase]
    PHASE_ALL: _ClassVar[Phase]

class OutOfDistribution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUT_OF_DISTRIBUTION_UNSPECIFIED: _ClassVar[OutOfDistribution]
    OUT_OF_DISTRIBUTION_FIRST_POSITION: _ClassVar[OutOfDistribution]
    OUT_OF_DISTRIBUTION_NORM_OUTLIER: _ClassVar[OutOfDistribution]
EDIT_MODE_UNSPECIFIED: EditMode
EDIT_MODE_ADD: EditMode
EDIT_MODE_CLAMP: EditMode
EDIT_MODE_SCALE: EditMode
EDIT_MODE_ABLATE: EditMode
PHASE_UNSPECIFIED: Phase
PHASE_PROMPT: Phase
PHASE_GENERATION: Phase
PHASE_ALL: Phase
OUT_OF_DISTRIBUTION_UNSPECIFIED: OutOfDistribution
OUT_OF_DISTRIBUTION_FIRST_POSITION: OutOfDistribution
OUT_OF_DISTRIBUTION_NORM_OUTLIER: OutOfDistribution

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("prompt", "chat", "token_ids")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: ChatMessages
    token_ids: TokenIds
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class FeatureEdit(_message.Message):
    __slots__ = ("feature", "mode", "value")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    feature: int
    mode: EditMode
    value: float
    def __init__(self, feature: _Optional[int] = ..., mode: _Optional[_Union[EditMode, str]] = ..., value: _Optional[float] = ...) -> None: ...

class SteeringVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("layer", "phase", "feature", "vector", "when")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    layer: int
    phase: Phase
    feature: FeatureEdit
    vector: SteeringVector
    when: Condition
    def __init__(self, layer: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., feature: _Optional[_Union[FeatureEdit, _Mapping]] = ..., vector: _Optional[_Union[SteeringVector, _Mapping]] = ..., when: _Optional[_Union[Condition, _Mapping]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("layer", "feature", "value", "sticky", "include_out_of_distribution")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OUT_OF_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    layer: int
    feature: int
    value: float
    sticky: bool
    include_out_of_distribution: bool
    def __init__(self, layer: _Optional[int] = ..., feature: _Optional[int] = ..., value: _Optional[float] = ..., sticky: _Optional[bool] = ..., include_out_of_distribution: _Optional[bool] = ...) -> None: ...

class Threshold(_message.Message):
    __slots__ = ("layer", "feature", "value")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    feature: int
    value: float
    def __init__(self, layer: _Optional[int] = ..., feature: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...

class MonitorRequest(_message.Message):
    __slots__ = ("layers", "top_k", "watch", "thresholds", "include_out_of_distribution")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    WATCH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OUT_OF_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    watch: _containers.RepeatedScalarFieldContainer[int]
    thresholds: _containers.RepeatedCompositeFieldContainer[Threshold]
    include_out_of_distribution: bool
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., watch: _Optional[_Iterable[int]] = ..., thresholds: _Optional[_Iterable[_Union[Threshold, _Mapping]]] = ..., include_out_of_distribution: _Optional[bool] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("position", "id", "text")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    position: int
    id: int
    text: str
    def __init__(self, position: _Optional[int] = ..., id: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class FeatureValue(_message.Message):
    __slots__ = ("feature", "value")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    feature: int
    value: float
    def __init__(self, feature: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...

class TokenFeatures(_message.Message):
    __slots__ = ("position", "layer", "top", "watch", "out_of_distribution", "out_of_distribution_reason")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    WATCH_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DISTRIBUTION_REASON_FIELD_NUMBER: _ClassVar[int]
    position: int
    layer: int
    top: _containers.RepeatedCompositeFieldContainer[FeatureValue]
    watch: _containers.RepeatedScalarFieldContainer[float]
    out_of_distribution: bool
    out_of_distribution_reason: OutOfDistribution
    def __init__(self, position: _Optional[int] = ..., layer: _Optional[int] = ..., top: _Optional[_Iterable[_Union[FeatureValue, _Mapping]]] = ..., watch: _Optional[_Iterable[float]] = ..., out_of_distribution: _Optional[bool] = ..., out_of_distribution_reason: _Optional[_Union[OutOfDistribution, str]] = ...) -> None: ...

class FeatureEvent(_message.Message):
    __slots__ = ("position", "layer", "feature", "value", "threshold", "monitor")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    position: int
    layer: int
    feature: int
    value: float
    threshold: float
    monitor: str
    def __init__(self, position: _Optional[int] = ..., layer: _Optional[int] = ..., feature: _Optional[int] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., monitor: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("input", "sampling", "interventions", "monitor")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    input: Input
    sampling: SamplingParams
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    monitor: MonitorRequest
    def __init__(self, input: _Optional[_Union[Input, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., monitor: _Optional[_Union[MonitorRequest, _Mapping]] = ...) -> None: ...

class PromptTokens(_message.Message):
    __slots__ = ("request_id", "tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("tokens", "text", "features", "events")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    text: str
    features: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    events: _containers.RepeatedCompositeFieldContainer[FeatureEvent]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., text: _Optional[str] = ..., features: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[FeatureEvent, _Mapping]]] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "time_to_first_token_s", "total_time_s", "decode_tokens_per_s", "text", "guardrail")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    total_time_s: float
    decode_tokens_per_s: float
    text: str
    guardrail: FeatureEvent
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., time_to_first_token_s: _Optional[float] = ..., total_time_s: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ..., text: _Optional[str] = ..., guardrail: _Optional[_Union[FeatureEvent, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("prompt", "chunk", "summary")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    prompt: PromptTokens
    chunk: TokenChunk
    summary: GenerateSummary
    def __init__(self, prompt: _Optional[_Union[PromptTokens, _Mapping]] = ..., chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("input", "monitor", "interventions")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    input: Input
    monitor: MonitorRequest
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    def __init__(self, input: _Optional[_Union[Input, _Mapping]] = ..., monitor: _Optional[_Union[MonitorRequest, _Mapping]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ...) -> None: ...

class InspectResponse(_message.Message):
    __slots__ = ("tokens", "features", "events")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    features: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    events: _containers.RepeatedCompositeFieldContainer[FeatureEvent]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., features: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[FeatureEvent, _Mapping]]] = ...) -> None: ...

class GetDictionaryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DictionaryLayer(_message.Message):
    __slots__ = ("layer", "d_sae", "architecture", "k", "scale", "has_catalog")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    HAS_CATALOG_FIELD_NUMBER: _ClassVar[int]
    layer: int
    d_sae: int
    architecture: str
    k: int
    scale: float
    has_catalog: bool
    def __init__(self, layer: _Optional[int] = ..., d_sae: _Optional[int] = ..., architecture: _Optional[str] = ..., k: _Optional[int] = ..., scale: _Optional[float] = ..., has_catalog: _Optional[bool] = ...) -> None: ...

class RequestLimits(_message.Message):
    __slots__ = ("max_tokens", "max_prompt_tokens", "max_edits", "max_watch", "max_top_k")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_EDITS_FIELD_NUMBER: _ClassVar[int]
    MAX_WATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    max_prompt_tokens: int
    max_edits: int
    max_watch: int
    max_top_k: int
    def __init__(self, max_tokens: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_edits: _Optional[int] = ..., max_watch: _Optional[int] = ..., max_top_k: _Optional[int] = ...) -> None: ...

class GetDictionaryResponse(_message.Message):
    __slots__ = ("model", "model_fingerprint", "d_model", "mode", "layers", "schema_version", "limits", "backend")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_fingerprint: str
    d_model: int
    mode: str
    layers: _containers.RepeatedCompositeFieldContainer[DictionaryLayer]
    schema_version: int
    limits: RequestLimits
    backend: str
    def __init__(self, model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., d_model: _Optional[int] = ..., mode: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[DictionaryLayer, _Mapping]]] = ..., schema_version: _Optional[int] = ..., limits: _Optional[_Union[RequestLimits, _Mapping]] = ..., backend: _Optional[str] = ...) -> None: ...

class Feature(_message.Message):
    __slots__ = ("layer", "feature", "label", "density", "mean_activation", "max_activation", "promoted", "suppressed", "contexts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    feature: int
    label: str
    density: float
    mean_activation: float
    max_activation: float
    promoted: _containers.RepeatedScalarFieldContainer[str]
    suppressed: _containers.RepeatedScalarFieldContainer[str]
    contexts: _containers.RepeatedCompositeFieldContainer[FeatureContext]
    def __init__(self, layer: _Optional[int] = ..., feature: _Optional[int] = ..., label: _Optional[str] = ..., density: _Optional[float] = ..., mean_activation: _Optional[float] = ..., max_activation: _Optional[float] = ..., promoted: _Optional[_Iterable[str]] = ..., suppressed: _Optional[_Iterable[str]] = ..., contexts: _Optional[_Iterable[_Union[FeatureContext, _Mapping]]] = ...) -> None: ...

class FeatureContext(_message.Message):
    __slots__ = ("activation", "text")
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    activation: float
    text: str
    def __init__(self, activation: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class ListFeaturesRequest(_message.Message):
    __slots__ = ("layer", "page_size", "page_token", "labeled_only")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LABELED_ONLY_FIELD_NUMBER: _ClassVar[int]
    layer: int
    page_size: int
    page_token: str
    labeled_only: bool
    def __init__(self, layer: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., labeled_only: _Optional[bool] = ...) -> None: ...

class ListFeaturesResponse(_message.Message):
    __slots__ = ("features", "next_page_token", "total_size")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[Feature]
    next_page_token: str
    total_size: int
    def __init__(self, features: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class GetFeatureRequest(_message.Message):
    __slots__ = ("layer", "feature")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    feature: int
    def __init__(self, layer: _Optional[int] = ..., feature: _Optional[int] = ...) -> None: ...

class GetFeatureResponse(_message.Message):
    __slots__ = ("feature",)
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    feature: Feature
    def __init__(self, feature: _Optional[_Union[Feature, _Mapping]] = ...) -> None: ...

class SearchFeaturesRequest(_message.Message):
    __slots__ = ("text", "top", "layers")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    text: str
    top: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., top: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("feature", "score", "mean_on_text", "fires_on")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MEAN_ON_TEXT_FIELD_NUMBER: _ClassVar[int]
    FIRES_ON_FIELD_NUMBER: _ClassVar[int]
    feature: Feature
    score: float
    mean_on_text: float
    fires_on: _containers.RepeatedCompositeFieldContainer[FeatureValueOnToken]
    def __init__(self, feature: _Optional[_Union[Feature, _Mapping]] = ..., score: _Optional[float] = ..., mean_on_text: _Optional[float] = ..., fires_on: _Optional[_Iterable[_Union[FeatureValueOnToken, _Mapping]]] = ...) -> None: ...

class FeatureValueOnToken(_message.Message):
    __slots__ = ("token", "value")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    token: str
    value: float
    def __init__(self, token: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class SearchFeaturesResponse(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ...) -> None: ...

class ResaeOptions(_message.Message):
    __slots__ = ("interventions", "monitor")
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    monitor: MonitorRequest
    def __init__(self, interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., monitor: _Optional[_Union[MonitorRequest, _Mapping]] = ...) -> None: ...

class ResaeFeatures(_message.Message):
    __slots__ = ("features", "events")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    events: _containers.RepeatedCompositeFieldContainer[FeatureEvent]
    def __init__(self, features: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[FeatureEvent, _Mapping]]] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("monitors",)
    MONITORS_FIELD_NUMBER: _ClassVar[int]
    monitors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, monitors: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchedEvent(_message.Message):
    __slots__ = ("request_id", "monitor", "action", "position", "token_id", "token_text", "layer", "feature", "value", "threshold", "time_unix_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    monitor: str
    action: str
    position: int
    token_id: int
    token_text: str
    layer: int
    feature: int
    value: float
    threshold: float
    time_unix_s: float
    def __init__(self, request_id: _Optional[str] = ..., monitor: _Optional[str] = ..., action: _Optional[str] = ..., position: _Optional[int] = ..., token_id: _Optional[int] = ..., token_text: _Optional[str] = ..., layer: _Optional[int] = ..., feature: _Optional[int] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., time_unix_s: _Optional[float] = ...) -> None: ...

class EventsDropped(_message.Message):
    __slots__ = ("dropped", "total")
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    total: int
    def __init__(self, dropped: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("dropped", "events")
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    dropped: EventsDropped
    events: _containers.RepeatedCompositeFieldContainer[WatchedEvent]
    def __init__(self, dropped: _Optional[_Union[EventsDropped, _Mapping]] = ..., events: _Optional[_Iterable[_Union[WatchedEvent, _Mapping]]] = ...) -> None: ...
