from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("image", "username", "password", "os_image")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    OS_IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    username: str
    password: str
    os_image: bool
    def __init__(self, image: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., os_image: _Optional[bool] = ...) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("digest", "done", "total", "image_id")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    digest: str
    done: int
    total: int
    image_id: str
    def __init__(self, digest: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., image_id: _Optional[str] = ...) -> None: ...

class ImportRequest(_message.Message):
    __slots__ = ("path", "name")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    path: str
    name: str
    def __init__(self, path: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ImportResponse(_message.Message):
    __slots__ = ("image_ids",)
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class OsImage(_message.Message):
    __slots__ = ("id", "repo_tags", "repo_digests", "size", "users")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPO_TAGS_FIELD_NUMBER: _ClassVar[int]
    REPO_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    repo_tags: _containers.RepeatedScalarFieldContainer[str]
    repo_digests: _containers.RepeatedScalarFieldContainer[str]
    size: int
    users: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., repo_tags: _Optional[_Iterable[str]] = ..., repo_digests: _Optional[_Iterable[str]] = ..., size: _Optional[int] = ..., users: _Optional[_Iterable[str]] = ...) -> None: ...

class ListOsImagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOsImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[OsImage]
    def __init__(self, images: _Optional[_Iterable[_Union[OsImage, _Mapping]]] = ...) -> None: ...

class RemoveOsImageRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    def __init__(self, image: _Optional[str] = ...) -> None: ...

class RemoveOsImageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
