use instream_core::config::KafkaConfig;
use instream_core::Service;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};

use crate::client::{send, Producer};
use crate::error::KafkaError;
use crate::headers;

/// Longest reason a dead letter carries (a longer one is cut at a character boundary).
const MAX_REASON_BYTES: usize = 4096;

fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Why a record was dead-lettered: the bounded label of `instream.dlq.code` and of the
/// `code` label of `instream_dead_letters_total` (`instream dlq tail --code` filters on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterCode {
    /// Not an instream event (not the envelope ingest writes).
    DecodeError,
    /// Its pipeline has no definition.
    UnknownPipeline,
    /// A reference-data miss under a `dead_letter` enrichment rule.
    EnrichMiss,
    /// The reference record found holds no usable JSON.
    RefdataMalformed,
    /// A data-quality rule with `action = "dead_letter"` failed.
    Quality,
    /// Larger than the brokers take (`kafka.max_record_bytes`) once processed.
    TooLarge,
    /// Event time beyond an aggregation's allowed lateness.
    TooLate,
    /// Event time too far ahead of its ingest time.
    FutureTime,
    /// Refused by the event validation at a source (db-source rows): the validation's code.
    Invalid(&'static str),
    /// A webhook notification its receiver did not take after every retry (or one that
    /// could not be sent): the notification's body, the last HTTP status in the reason.
    WebhookFailed,
}

impl DeadLetterCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterCode::DecodeError => "decode_error",
            DeadLetterCode::UnknownPipeline => "unknown_pipeline",
            DeadLetterCode::EnrichMiss => "enrich_miss",
            DeadLetterCode::RefdataMalformed => "refdata_malformed",
            DeadLetterCode::Quality => "quality",
            DeadLetterCode::TooLarge => "too_large",
            DeadLetterCode::TooLate => "too_late",
            DeadLetterCode::FutureTime => "future_time",
            DeadLetterCode::Invalid(code) => code,
            DeadLetterCode::WebhookFailed => "webhook_failed",
        }
    }
}

impl std::fmt::Display for DeadLetterCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a dead record came from, when it came from a topic.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// One record to dead-letter: the bytes as they came, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// The dead-letter topic, `instream_pipeline::topics::dead_letter(pipeline)`.
    pub topic: &'a str,
    pub pipeline: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub code: DeadLetterCode,
    /// The precise, human-readable reason.
    pub reason: &'a str,
    pub origin: Option<Origin<'a>>,
}

/// Publishes dead letters (to `<pipeline>.dlq`). Nothing is dropped silently: every refused record lands
/// there with its reason, and `instream_dead_letters_total` counts it.
#[derive(Clone)]
pub struct DeadLetters {
    producer: Producer,
    service: Service,
}

impl DeadLetters {
    pub fn new(producer: Producer, service: Service) -> Self {
        Self { producer, service }
    }

    pub fn from_config(cfg: &KafkaConfig, service: Service) -> Result<Self, KafkaError> {
        Ok(Self::new(
            crate::client::producer(cfg, service.as_str())?,
            service,
        ))
    }

    /// The producer dead letters go through (to wait for their deliveries).
    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Enqueues the dead letter; the future resolves when the broker has it. The origin's
    /// offset may be committed only after that.
    pub async fn publish(&self, dl: &DeadLetter<'_>) -> Result<DeliveryFuture, KafkaError> {
        // A dead letter must fit where its record did not: the payload is cut short (the
        // header says from how many bytes), the reason too.
        let room = self.producer.max_record_bytes() / 2;
        let payload = &dl.payload[..dl.payload.len().min(room)];
        let reason = cut(dl.reason, MAX_REASON_BYTES);
        let mut hs = OwnedHeaders::new()
            .insert(Header {
                key: headers::DLQ_CODE,
                value: Some(dl.code.as_str()),
            })
            .insert(Header {
                key: headers::DLQ_REASON,
                value: Some(reason),
            })
            .insert(Header {
                key: headers::DLQ_SERVICE,
                value: Some(self.service.as_str()),
            });
        if let Some(origin) = &dl.origin {
            hs = hs
                .insert(Header {
                    key: headers::ORIGIN_TOPIC,
                    value: Some(origin.topic),
                })
                .insert(Header {
                    key: headers::ORIGIN_PARTITION,
                    value: Some(&origin.partition.to_string()),
                })
                .insert(Header {
                    key: headers::ORIGIN_OFFSET,
                    value: Some(&origin.offset.to_string()),
                });
        }
        let original = dl.payload.len().to_string();
        if payload.len() < dl.payload.len() {
            hs = hs.insert(Header {
                key: headers::DLQ_CUT_FROM,
                value: Some(&original),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(dl.topic).payload(payload).headers(hs);
        if let Some(key) = dl.key {
            record = record.key(key);
        }
        let delivery = send(&self.producer, record).await?;
        metrics::counter!(
            "instream_dead_letters_total",
            "service" => self.service.as_str(),
            "pipeline" => dl.pipeline.to_owned(),
            "code" => dl.code.as_str()
        )
        .increment(1);
        tracing::debug!(
            service = %self.service,
            pipeline = dl.pipeline,
            code = %dl.code,
            reason = dl.reason,
            "dead-lettered"
        );
        Ok(delivery)
    }

    /// Dead-letters a consumed record as it came, to the dead-letter topic of the pipeline its
    /// topic belongs to, with the record as origin.
    pub async fn publish_record(
        &self,
        record: &crate::Record,
        code: DeadLetterCode,
        reason: &str,
    ) -> Result<DeliveryFuture, KafkaError> {
        let pipeline = instream_pipeline::topics::pipeline_of(&record.topic);
        let topic = instream_pipeline::topics::dead_letter(pipeline);
        self.publish(&DeadLetter {
            topic: &topic,
            pipeline,
            key: record.key.as_deref(),
            payload: &record.payload,
            code,
            reason,
            origin: Some(Origin {
                topic: &record.topic,
                partition: record.partition,
                offset: record.offset,
            }),
        })
        .await
    }
}
